"""Checkpoint loading: formats, selective (per-rank) reads, MTP skipping, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moecluster.workers.checkpoint.loader import CheckpointError, checkpoint_files
from moecluster.workers.config import ConfigError
from moecluster.workers.model_loader import load_model


def rewrite(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001
    """Copy a checkpoint into one safetensors file, letting `edit` change its tensor dict."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def edit_config(ckpt: Path, dst: Path, change) -> Path:  # noqa: ANN001
    shutil.copytree(ckpt, dst)
    cfg = json.loads((dst / "config.json").read_text())
    change(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("quant", ["none", "fp8", "int4"])
def test_quantized_weights_stay_quantized(tiny_checkpoint, quant: str) -> None:
    model = load_model(tiny_checkpoint(quant=quant), dtype="bfloat16")
    experts = model.layers[1].mlp.experts
    expected = {"none": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int4": torch.int32}[quant]
    payload = experts.gate_proj.weight_packed if quant == "int4" else experts.gate_proj.weight
    assert payload.dtype == expected
    attn = model.layers[0].self_attn.q_a_proj.weight.dtype
    assert attn == (torch.float8_e4m3fn if quant == "fp8" else torch.bfloat16)  # INT4 leaves attention alone


def test_single_file_and_sharded_load_the_same(tiny_checkpoint, tmp_path) -> None:
    ckpt = tiny_checkpoint()
    single = rewrite(ckpt, tmp_path / "single", lambda t: None)
    a, b = load_model(ckpt, dtype="float32"), load_model(single, dtype="float32")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_mtp_layer_is_skipped(tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint()
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1
    mtp = f"model.layers.{cfg['num_hidden_layers']}."
    assert any(name.startswith(mtp) for name in checkpoint_files(ckpt))
    model = load_model(ckpt, dtype="float32")
    assert len(model.layers) == cfg["num_hidden_layers"]


def test_rank_reads_only_its_experts(tiny_checkpoint, tmp_path) -> None:
    """A rank owning experts {1, 6} loads from a checkpoint that holds no other expert."""
    ckpt = tiny_checkpoint(quant="int4")
    mine = [1, 6]

    def keep_mine(tensors: dict) -> None:
        for name in [n for n in tensors if ".mlp.experts." in n]:
            if int(name.split(".mlp.experts.")[1].split(".")[0]) not in mine:
                del tensors[name]

    partial = rewrite(ckpt, tmp_path / "partial", keep_mine)
    part = load_model(partial, dtype="float32", expert_ids=mine)
    full = load_model(ckpt, dtype="float32")
    for layer in (1, 2):
        got, ref = part.layers[layer].mlp.experts, full.layers[layer].mlp.experts
        for local, expert in enumerate(mine):
            assert torch.equal(got.down_proj.dequantize(torch.float32, local), ref.down_proj.dequantize(torch.float32, expert))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight_packed"):
        load_model(partial, dtype="float32")


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path) -> None:
    broken = rewrite(tiny_checkpoint(), tmp_path / "b", lambda t: t.pop("model.layers.0.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.kv_b_proj\.weight' is missing"):
        load_model(broken)


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path) -> None:
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    broken = rewrite(tiny_checkpoint(), tmp_path / "b", lambda t: t.__setitem__(name, t[name][:-1]))
    with pytest.raises(CheckpointError, match=rf"'{name}'.*shape \(191, 256\), expected \(192, 256\)"):
        load_model(broken)


def test_unquantized_tensor_where_fp8_is_declared(tiny_checkpoint, tmp_path) -> None:
    name = "model.layers.0.self_attn.o_proj.weight"
    broken = rewrite(tiny_checkpoint(quant="fp8"), tmp_path / "b", lambda t: t.__setitem__(name, t[name].to(torch.bfloat16)))
    with pytest.raises(CheckpointError, match=rf"'{name}'.*dtype torch.bfloat16, expected torch.float8_e4m3fn"):
        load_model(broken)


def test_fp8_tensor_without_quantization_config(tiny_checkpoint, tmp_path) -> None:
    undeclared = edit_config(tiny_checkpoint(quant="fp8"), tmp_path / "b", lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="float8"):
        load_model(undeclared)


def test_int4_weight_shape_must_agree(tiny_checkpoint, tmp_path) -> None:
    name = "model.layers.1.mlp.experts.0.down_proj.weight_shape"
    broken = rewrite(tiny_checkpoint(quant="int4"), tmp_path / "b", lambda t: t.__setitem__(name, torch.tensor([256, 160], dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=rf"'{name}'.*\[256, 160\], expected \[256, 192\]"):
        load_model(broken)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["quantization_config"].__setitem__("quant_method", "awq"), "quant_method"),
        (lambda c: c["quantization_config"].__setitem__("format", "float-quantized"), "format"),
        (lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].__setitem__("num_bits", 8), "num_bits"),
    ],
)
def test_unknown_quantization_is_named(tiny_checkpoint, tmp_path, change, message: str) -> None:  # noqa: ANN001
    bad = edit_config(tiny_checkpoint(quant="int4"), tmp_path / "b", change)
    with pytest.raises(ConfigError, match=message):
        load_model(bad)


def test_no_weights_at_all(tmp_path, tiny_checkpoint) -> None:
    ckpt = tiny_checkpoint()
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(ckpt / "config.json", empty / "config.json")
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        load_model(empty)


def test_index_naming_a_missing_shard(tiny_checkpoint, tmp_path) -> None:
    bad = tmp_path / "b"
    shutil.copytree(tiny_checkpoint(), bad)
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model(bad)


def test_no_config(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
