"""`moecluster plan`: the per-GPU memory arithmetic, checked against sums written out by hand.

The expected numbers here are computed from the published shapes with small helpers of this file
(fp8 / int4 / bf16 bytes of one matrix), not with the planner's code.
"""

from __future__ import annotations

import json
from math import ceil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moecluster.cluster.cli import main
from moecluster.cluster.plan import PlanConfig, make_plan, weight_breakdown
from moecluster.cluster.plan.presets import DEEPSEEK_V3
from moecluster.workers.config import ModelConfig

MiB, GiB = 2**20, 2**30
H100, H200 = 81_079 * MiB, 143_155 * MiB  # the capacities the planner documents
KV_BF16_61 = 61 * (512 + 64) * 2  # bytes per token: 61 layers x 576 latent values x bf16


def fp8(o: int, i: int) -> int:
    """e4m3 weight + one float32 scale per 128x128 block (partial blocks count whole)."""
    return o * i + ceil(o / 128) * ceil(i / 128) * 4


def int4(o: int, i: int) -> int:
    """int32 words of 8 nibbles + a bf16 scale per 32 inputs + the int32 weight_shape pair."""
    return o * i // 2 + o * (i // 32) * 2 + 8


def bf16(o: int, i: int) -> int:
    return o * i * 2


def headroom(capacity: int, heads: int, context: int) -> int:
    """What the engine keeps out of its cache beside the weights, for these models' shapes (hidden
    7168, MoE width 2048 top-8, dense width 18432, MLA 192 / 128 head dims, latent 576) with the
    defaults: 10% of the GPU held back, 3 GiB in use before sizing, and one 8192-token prefill
    chunk's activations at `context`, expanded keys and values up to MLA's 16384-token segment."""
    moe = 8 * (7168 * (3 * 2 + 4) + 2048 * 2)  # routed copies: gathered, output, fp32 weighted, cast; intermediate
    per_token = max(moe, 3 * 18432 * 2) + heads * (2 * 192 + 128) * 2 + 4 * 7168 * 2
    expanded = min(context, 16384) * heads * (2 * 192 + 128) * 2
    latent = 2 * context * 576 * 2
    merged = 8192 * heads * (8 * 128 + 2 * 192) if context > 16384 else 0  # fp32 output + temporary, a segment's output
    activations = int(1.25 * (8192 * per_token + expanded + latent + merged))
    return round(0.1 * capacity) + 3 * GiB + activations


def seqs(kv_bytes: int, context: int, block: int = 64) -> int:
    return kv_bytes // (block * KV_BF16_61) // ceil(context / block)


def test_kv_bytes_per_token() -> None:
    assert KV_BF16_61 == 70_272
    assert make_plan("deepseek-v3", PlanConfig(gpu="h100")).kv_per_token == 70_272
    assert make_plan("kimi-k2", PlanConfig(gpu="h100", kv_dtype="fp8")).kv_per_token == 35_136


def test_deepseek_v3_by_hand() -> None:
    h, layers, dense, moe, experts, inter, heads, vocab = 7168, 61, 3, 58, 256, 2048, 128, 129280
    attn_params = 1536 * h + heads * 192 * 1536 + 576 * h + heads * 256 * 512 + h * heads * 128
    norm_params = 1536 + 512 + 2 * h
    expert_params = 3 * inter * h
    gate_params = experts * h + experts
    total = (layers * (attn_params + norm_params) + dense * 3 * 18432 * h
             + moe * (gate_params + expert_params + experts * expert_params) + 2 * vocab * h + h)
    w = weight_breakdown(ModelConfig.from_hf(DEEPSEEK_V3))
    assert w.total_params == total
    assert abs(total - 671e9) < 0.5e9  # the published 671B main model (685B with the MTP module)
    assert abs(total + w.mtp_params - 685e9) < 1e9
    activated = total - moe * experts * expert_params + moe * 8 * expert_params
    assert w.activated_params == activated and abs(activated - 37.6e9) < 0.1e9

    expert_bytes = 3 * (2048 * 7168 + ceil(2048 / 128) * ceil(7168 / 128) * 4)
    assert expert_bytes == 44_050_944 == fp8(2048, h) * 2 + fp8(h, 2048)
    attn_bytes = (fp8(1536, h) + fp8(heads * 192, 1536) + fp8(576, h) + fp8(heads * 256, 512) + fp8(h, heads * 128)
                  + norm_params * 2 + heads * 256 * 512 * 2)  # + absorbed w_uk / w_uv in bf16
    replicated = (layers * attn_bytes + dense * (2 * fp8(18432, h) + fp8(h, 18432))
                  + moe * (gate_params * 4 + expert_bytes) + 2 * bf16(vocab, h) + 2 * h)
    assert w.replicated_bytes == replicated
    assert w.expert_slot_bytes == moe * expert_bytes

    # 2 nodes x 8 H100 at 128K: EP 16, 16 experts per rank: the weights fit, the engine's headroom
    # (7.9 GiB held back, 3 in use, 12 of activations) does not
    p = make_plan("deepseek-v3", PlanConfig(gpu="h100", nodes=2, context=131072))
    weights = replicated + 16 * moe * expert_bytes
    assert p.rank.ep == 16 and p.rank.experts_per_rank == 16 and p.rank.weights_bytes == weights
    kv = H100 - weights - headroom(H100, heads, 131072)
    assert p.rank.kv_bytes == kv < 0 and p.rank.seqs_per_gpu == 0
    assert p.verdict.startswith("does not fit at EP 16") and "fit alone but not with" in p.verdict
    assert p.minimal is not None and p.minimal.ep == 24  # 256 / 24 -> 11 experts per rank
    kv24 = H100 - (replicated + 11 * moe * expert_bytes) - headroom(H100, heads, 131072)
    assert p.minimal.experts_per_rank == 11 and p.minimal.seqs_per_gpu == seqs(kv24, 131072) == 1
    assert p.comfortable is not None and p.comfortable.ep == 32 and p.comfortable.experts_per_rank == 8


def test_kimi_k2_by_hand() -> None:
    h, moe, experts, heads, vocab = 7168, 60, 384, 64, 163840
    attn_params = 1536 * h + heads * 192 * 1536 + 576 * h + heads * 256 * 512 + h * heads * 128
    expert_params = 3 * 2048 * h
    total = (61 * (attn_params + 1536 + 512 + 2 * h) + 3 * 18432 * h
             + moe * (experts * h + experts + expert_params + experts * expert_params) + 2 * vocab * h + h)
    p = make_plan("kimi-k2", PlanConfig(gpu="h200", context=131072))
    assert p.weights.total_params == total and abs(total - 1.026e12) < 1e9  # published: "1T total"
    assert abs(p.weights.activated_params - 32.9e9) < 0.1e9  # published: "32B activated"
    assert p.weights.mtp_params == 0

    attn_bytes = (fp8(1536, h) + fp8(heads * 192, 1536) + fp8(576, h) + fp8(heads * 256, 512) + fp8(h, heads * 128)
                  + (1536 + 512 + 2 * h) * 2 + heads * 256 * 512 * 2)
    expert_bytes = fp8(2048, h) * 2 + fp8(h, 2048)
    replicated = (61 * attn_bytes + 2 * fp8(18432, h) + fp8(h, 18432) + moe * ((experts * h + experts) * 4 + expert_bytes)
                  + 2 * bf16(vocab, h) + 2 * h)
    weights = replicated + 48 * moe * expert_bytes  # one node of 8: 384 / 8 = 48 experts per rank
    assert p.rank.weights_bytes == weights < H200
    kv = H200 - weights - headroom(H200, heads, 131072)  # 132.7 GiB of weights + 26 of headroom
    assert p.rank.kv_bytes == kv < 0 and not p.rank.fits
    assert p.minimal is not None and p.minimal.ep == 16
    kv16 = H200 - (replicated + 24 * moe * expert_bytes) - headroom(H200, heads, 131072)
    assert p.minimal.seqs_per_gpu == seqs(kv16, 131072) == 4
    # 16 H100s hold the weights but not with the headroom: 73.6 GiB + 20.3 GiB > 79.2 GiB
    p16 = make_plan("kimi-k2", PlanConfig(gpu="h100", nodes=2, context=131072))
    assert p16.rank.weights_bytes == replicated + 24 * moe * expert_bytes < H100
    assert p16.rank.kv_bytes == H100 - p16.rank.weights_bytes - headroom(H100, heads, 131072) < 0
    assert not p16.rank.fits and p16.verdict.startswith("does not fit at EP 16")


def test_kimi_k2_thinking_on_4_h200_at_256k() -> None:
    h, moe, heads, vocab = 7168, 60, 64, 163840
    expert_bytes = int4(2048, h) * 2 + int4(h, 2048)
    assert expert_bytes == 3 * (2048 * 7168 // 2 + 2048 * 224 * 2 + 8) == 24_772_632
    attn_bytes = (bf16(1536, h) + bf16(heads * 192, 1536) + bf16(576, h) + bf16(heads * 256, 512) + bf16(h, heads * 128)
                  + (1536 + 512 + 2 * h) * 2 + heads * 256 * 512 * 2)
    replicated = (61 * attn_bytes + 3 * bf16(18432, h) + moe * ((384 * h + 384) * 4 + 3 * bf16(2048, h))
                  + 2 * bf16(vocab, h) + 2 * h)
    p = make_plan("kimi-k2-thinking", PlanConfig(gpu="h200", gpus_per_node=4, nodes=1, context=262144))
    weights = replicated + 96 * moe * expert_bytes  # 384 / 4 experts per rank
    assert p.rank.weights_bytes == weights
    assert weights > H200  # 156 GiB of weights per rank against 139.8 GiB: no room at all
    assert not p.rank.fits and p.rank.seqs_per_gpu == 0
    assert p.verdict.startswith("does not fit at EP 4") and "alone exceed it" in p.verdict
    assert p.minimal is not None and p.minimal.ep == 8 and p.minimal.replicas == 0  # needs 8 H200s
    kv8 = H200 - (replicated + 48 * moe * expert_bytes) - headroom(H200, heads, 262144)
    assert p.minimal.seqs_per_gpu == seqs(kv8, 262144) == 1


def test_context_defaults_to_the_models_max() -> None:
    assert make_plan("kimi-k2-thinking", PlanConfig(gpu="h200")).context == 262144


@pytest.mark.parametrize(
    "knobs",
    [{}, {"quant": "fp8", "num_layers": 2, "num_experts": 8},
     {"arch": "kimi-k2", "quant": "int4", "num_layers": 2, "num_experts": 8}],
)
def test_checkpoint_dir_matches_its_files(tiny_checkpoint, capsys: pytest.CaptureFixture[str], knobs: dict) -> None:
    """Params and bytes from config.json equal the tensors on disk (main model only; plus the
    float32 gate upcast and the absorbed MLA copies, which are not checkpoint tensors)."""
    ckpt: Path = tiny_checkpoint(**knobs)
    raw = json.loads((ckpt / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    layers = raw["num_hidden_layers"]
    main_model = {k: v for k, v in tensors.items() if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= layers)}
    params = sum(v.numel() for k, v in main_model.items() if k.endswith(".weight") or k.endswith(".e_score_correction_bias"))
    params += sum(int(v[0]) * int(v[1]) for k, v in main_model.items() if k.endswith(".weight_shape"))
    disk_bytes = sum(v.numel() * v.element_size() for v in main_model.values())
    gate_upcast = sum(v.numel() * 2 for k, v in main_model.items() if k.endswith(".mlp.gate.weight"))
    absorbed = layers * raw["num_attention_heads"] * (raw["qk_nope_head_dim"] + raw["v_head_dim"]) * raw["kv_lora_rank"] * 2

    assert main(["plan", "--model", str(ckpt), "--gpu", "h100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["total"] == params
    assert out["weights"]["total_bytes"] == disk_bytes + gate_upcast + absorbed
    assert out["context"] == raw["max_position_embeddings"]
    assert out["kv_bytes_per_token"] == layers * (raw["kv_lora_rank"] + raw["qk_rope_head_dim"]) * 2
    assert out["rank"]["fits"] and out["rank"]["ep"] == 8
    assert out["verdict"].startswith("fits at EP 8")
    assert any("MTP" in n for n in out["notes"]) == (raw["num_nextn_predict_layers"] > 0)


def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "kimi-k2-thinking", "--gpu", "h200", "--gpus-per-node", "4", "--context", "256K"]) == 0
    out = capsys.readouterr().out
    assert "routed_experts" in out and "verdict:" in out and "does not fit at EP 4" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gpt-5", "--gpu", "h100"], "unknown model 'gpt-5'"),
        (["--model", "deepseek-v3", "--gpu", "a100"], "unknown GPU 'a100'"),
        (["--model", "deepseek-v3", "--gpu", "h100", "--nodes", "0"], "--nodes must be at least 1"),
        (["--model", "kimi-k2", "--gpu", "h200", "--context", "256K"], "exceeds kimi-k2's max_position_embeddings 131072"),
        (["--model", "deepseek-v3", "--gpu", "h100", "--ep", "16"], "--ep 16 exceeds the 8 GPUs"),
        (["--model", "deepseek-v3", "--gpu", "h100", "--kv-dtype", "int8"], "unknown --kv-dtype"),
    ],
)
def test_errors_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", str(tmp_path), "--gpu", "h100"]) == 2
    assert "no config.json" in capsys.readouterr().err
