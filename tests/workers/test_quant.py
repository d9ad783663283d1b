"""Weight quantization formats: block FP8, pack-quantized INT4 and the quantization_config parser.

INT4 packing is cross-checked bit for bit against compressed-tensors' own implementation.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from moecluster.workers.quant import (
    FP8_DTYPE,
    Fp8BlockScheme,
    Int4GroupScheme,
    UnsupportedQuantization,
    dequantize_fp8_block,
    dequantize_int4_group,
    pack_int4,
    parse_quant_config,
    quantize_fp8_block,
    quantize_int4_group,
    unpack_int4,
)


def _load_compressed_tensors_packing():
    """compressed-tensors' pack_to_int32 / unpack_from_int32, loaded from its helpers.py alone.

    `import compressed_tensors...` runs the package __init__, which pulls in transformers and costs
    about 4 s; helpers.py itself needs only torch, so load that one file by path.
    """
    spec = importlib.util.find_spec("compressed_tensors")
    assert spec is not None and spec.origin, "compressed-tensors (dev extra) is required here"
    path = Path(spec.origin).parent / "compressors" / "pack_quantized" / "helpers.py"
    helpers_spec = importlib.util.spec_from_file_location("_ct_pack_helpers", path)
    helpers = importlib.util.module_from_spec(helpers_spec)
    helpers_spec.loader.exec_module(helpers)
    return helpers.pack_to_int32, helpers.unpack_from_int32


pack_to_int32, unpack_from_int32 = _load_compressed_tensors_packing()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float32)


def _rand_int4(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(-8, 8, shape, generator=_gen(seed), dtype=torch.int8)


# ---------------------------------------------------------------- FP8 block


def test_fp8_dequant_matches_formula_elementwise():
    block = (3, 4)
    weight = (_randn(7, 10, seed=0) * 50).to(FP8_DTYPE)  # partial blocks on both dims
    scale_inv = _randn(3, 3, seed=1).abs() + 0.1  # ceil(7/3), ceil(10/4)
    out = dequantize_fp8_block(weight, scale_inv, block, torch.float32)
    for i in range(7):
        for j in range(10):
            expected = weight[i, j].float() * scale_inv[i // 3, j // 4]  # float32 product
            assert out[i, j].item() == expected.item()


def test_fp8_dequant_hand_built():
    weight = torch.tensor([[1.0, 2.0, -3.0], [4.0, 0.5, 448.0]]).to(FP8_DTYPE)
    scale_inv = torch.tensor([[2.0, 0.25], [0.5, 8.0]])  # block (1, 2): columns {0,1} and {2}
    out = dequantize_fp8_block(weight, scale_inv, (1, 2), torch.float32)
    assert torch.equal(out, torch.tensor([[2.0, 4.0, -0.75], [2.0, 0.25, 3584.0]]))
    assert dequantize_fp8_block(weight, scale_inv, (1, 2), torch.bfloat16).dtype == torch.bfloat16


def test_fp8_round_trip_error_bound_with_partial_blocks():
    w = _randn(130, 200, seed=2) * torch.logspace(-3, 1, 200)  # rows of varied magnitude
    q, scale_inv = quantize_fp8_block(w, (128, 128))
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (2, 2)
    back = dequantize_fp8_block(q, scale_inv, (128, 128), torch.float32)
    # e4m3: 3 mantissa bits -> relative error <= 2**-4; subnormal step 2**-9 -> 2**-10 * scale.
    per_elem_scale = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:130, :200]
    assert ((back - w).abs() <= w.abs() / 16 + per_elem_scale * 2**-10).all()
    # Every block's absolute max maps to 448 (also the partial edge blocks).
    for bo in range(2):
        for bi in range(2):
            tile = q[bo * 128:(bo + 1) * 128, bi * 128:(bi + 1) * 128].float()
            assert tile.abs().max().item() == 448.0
            w_tile = w[bo * 128:(bo + 1) * 128, bi * 128:(bi + 1) * 128]
            torch.testing.assert_close(scale_inv[bo, bi], w_tile.abs().max() / 448, rtol=0, atol=0)


def test_fp8_exact_for_representable_weights():
    values = torch.tensor([448.0, -448.0, 1.0, -0.5, 0.0, 3.5, 256.0, -0.015625])  # all e4m3 values
    w = values.repeat(4, 2) * 2.0**-5  # block max 448 * 2**-5 -> scale_inv 2**-5, exact
    q, scale_inv = quantize_fp8_block(w, (2, 8))
    assert torch.equal(scale_inv, torch.full((2, 2), 2.0**-5))
    assert torch.equal(dequantize_fp8_block(q, scale_inv, (2, 8), torch.float32), w)


def test_fp8_zero_block_gets_unit_scale():
    w = _randn(8, 8, seed=3)
    w[:4, 4:] = 0
    q, scale_inv = quantize_fp8_block(w, (4, 4))
    assert scale_inv[0, 1].item() == 1.0
    assert (q[:4, 4:].float() == 0).all()
    assert not torch.isnan(q.float()).any()


def test_fp8_leading_expert_dims_match_per_matrix():
    w = _randn(3, 20, 40, seed=4).to(torch.bfloat16)
    q, scale_inv = quantize_fp8_block(w, (8, 16))
    assert q.shape == (3, 20, 40) and scale_inv.shape == (3, 3, 3)
    for e in range(3):
        qe, se = quantize_fp8_block(w[e], (8, 16))
        assert torch.equal(q[e].view(torch.uint8), qe.view(torch.uint8))
        assert torch.equal(scale_inv[e], se)
    back = dequantize_fp8_block(q, scale_inv, (8, 16), torch.float32)
    for e in range(3):
        one = dequantize_fp8_block(q[e], scale_inv[e], (8, 16), torch.float32)
        assert torch.equal(back[e], one)


def test_fp8_errors():
    q, s = quantize_fp8_block(_randn(10, 20, seed=5), (4, 8))
    with pytest.raises(ValueError, match=r"weight_scale_inv shape \(3, 2\).*expected \(3, 3\)"):
        dequantize_fp8_block(q, s[:, :2], (4, 8))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        dequantize_fp8_block(q.float(), s, (4, 8))
    with pytest.raises(ValueError, match="block"):
        quantize_fp8_block(_randn(4, 4, seed=6), (0, 4))
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_fp8_block(torch.tensor([[float("inf"), 1.0]]), (1, 2))
    with pytest.raises(ValueError, match=r"\(..., out, in\)"):
        quantize_fp8_block(_randn(8, seed=7), (4, 4))


# ---------------------------------------------------------------- INT4 pack-quantized


def test_pack_int4_hand_built_words():
    q = torch.tensor(
        [
            [-8, -7, -6, -5, -4, -3, -2, -1],  # nibbles 0..7, first value lowest
            [7, 7, 7, 7, 7, 7, 7, 7],  # all ones: -1 as int32
            [-8, -8, -8, -8, -8, -8, -8, 7],  # only the top nibble set: negative word
            [0, 0, 0, 0, 0, 0, 0, 0],  # all 8s
        ],
        dtype=torch.int8,
    )
    expected = [0x76543210, -1, 0xF0000000 - 2**32, 0x88888888 - 2**32]
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (4, 1)
    assert packed[:, 0].tolist() == expected
    assert torch.equal(unpack_int4(packed, 8), q)


@pytest.mark.parametrize("shape", [(16, 64), (3, 8, 256)])
def test_int4_packing_matches_compressed_tensors(shape):
    q = _rand_int4(*shape, seed=8)
    ours = pack_int4(q)
    theirs = pack_to_int32(q, num_bits=4)
    assert ours.shape == (*shape[:-1], shape[-1] // 8)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_int4(theirs, shape[-1]), q)
    assert torch.equal(unpack_from_int32(ours, 4, torch.Size(shape)), q)


def test_int4_dequant_matches_formula():
    q = _rand_int4(4, 64, seed=9)
    scale = (_randn(4, 2, seed=10).abs() + 0.01).to(torch.bfloat16)
    out = dequantize_int4_group(pack_int4(q), scale, 32, 64, torch.float32)
    expected = q.float() * scale.float().repeat_interleave(32, dim=1)
    assert torch.equal(out, expected)
    assert dequantize_int4_group(pack_int4(q), scale, 32, 64).dtype == torch.bfloat16


def test_int4_exact_for_representable_weights():
    q = _rand_int4(6, 64, seed=11).clamp(-7, 7)
    q[:, ::32] = 7  # every group reaches +7, so amax / 7 is the chosen power-of-two scale
    scale = 2.0 ** torch.randint(-6, 3, (6, 2), generator=_gen(12)).float()
    w = q.float() * scale.repeat_interleave(32, dim=1)
    packed, s, shape = quantize_int4_group(w, 32)
    assert torch.equal(s.float(), scale)
    assert torch.equal(unpack_int4(packed, 64), q)
    assert torch.equal(dequantize_int4_group(packed, s, 32, 64, torch.float32), w)


def test_int4_round_trip_error_bound():
    w = _randn(32, 128, seed=13) * torch.logspace(-2, 1, 32).unsqueeze(1)
    packed, scale, shape = quantize_int4_group(w, 32)
    assert packed.dtype == torch.int32 and packed.shape == (32, 16)
    assert scale.dtype == torch.bfloat16 and scale.shape == (32, 4)
    assert shape.dtype == torch.int32 and shape.tolist() == [32, 128]
    back = dequantize_int4_group(packed, scale, 32, 128, torch.float32)
    per_elem_scale = scale.float().repeat_interleave(32, dim=1)
    assert ((back - w).abs() <= per_elem_scale / 2 * (1 + 1e-6)).all()
    # Symmetric grid: the group max lands on +-7 and -8 is never used.
    q = unpack_int4(packed, 128)
    assert q.min().item() >= -7 and (q.abs().reshape(32, 4, 32).amax(-1) == 7).all()


def test_int4_zero_group_and_scale_dtype():
    w = _randn(2, 64, seed=14)
    w[1, 32:] = 0
    packed, scale, _ = quantize_int4_group(w, 32, scale_dtype=torch.float32)
    assert scale.dtype == torch.float32 and scale[1, 1].item() == 1.0
    assert (unpack_int4(packed, 64)[1, 32:] == 0).all()


def test_int4_leading_expert_dims_match_per_matrix():
    w = _randn(4, 16, 64, seed=15)
    packed, scale, shape = quantize_int4_group(w, 32)
    assert packed.shape == (4, 16, 8) and scale.shape == (4, 16, 2) and shape.tolist() == [16, 64]
    for e in range(4):
        pe, se, _ = quantize_int4_group(w[e], 32)
        assert torch.equal(packed[e], pe) and torch.equal(scale[e], se)
    assert torch.equal(packed, pack_to_int32(unpack_int4(packed, 64), num_bits=4))
    back = dequantize_int4_group(packed, scale, 32, 64, torch.float32)
    assert torch.equal(back[2], dequantize_int4_group(packed[2], scale[2], 32, 64, torch.float32))


def test_int4_shape_errors():
    with pytest.raises(ValueError, match=r"in_features=36 \(tensor shape \(4, 36\)\).*of 8"):
        quantize_int4_group(_randn(4, 36, seed=16), 4)
    with pytest.raises(ValueError, match=r"in_features=48 .*multiple of 32 \(group_size\)"):
        quantize_int4_group(_randn(4, 48, seed=17), 32)
    with pytest.raises(ValueError, match=r"multiple of 8"):
        pack_int4(_rand_int4(2, 12, seed=18))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((1, 8), 8, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        pack_int4(torch.zeros(1, 8, dtype=torch.int32))
    packed = pack_int4(_rand_int4(2, 64, seed=19))
    with pytest.raises(ValueError, match=r"packed shape \(2, 8\).*in_features=32"):
        unpack_int4(packed, 32)
    with pytest.raises(ValueError, match=r"weight_scale shape \(2, 1\).*expected \(2, 2\)"):
        dequantize_int4_group(packed, torch.ones(2, 1), 32, 64)
    with pytest.raises(ValueError, match="int32"):
        unpack_int4(packed.to(torch.int64), 64)


# ---------------------------------------------------------------- quantization_config


DEEPSEEK_FP8 = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}

KIMI_K2_THINKING_INT4 = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": 32,
                "num_bits": 4,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "group",
                "symmetric": True,
                "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "ignore": [
        "lm_head",
        "re:.*self_attn.*",
        "re:.*shared_experts.*",
        "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
    ],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}


Q = "quantization_config"


def _kimi(**weights):
    cfg = copy.deepcopy(KIMI_K2_THINKING_INT4)
    cfg["config_groups"]["group_0"]["weights"].update(weights)
    return cfg


def test_parse_none_and_published_configs():
    assert parse_quant_config(None) is None
    fp8 = parse_quant_config(DEEPSEEK_FP8)
    assert fp8 == Fp8BlockScheme(block=(128, 128))
    int4 = parse_quant_config(KIMI_K2_THINKING_INT4)
    assert isinstance(int4, Int4GroupScheme)
    assert int4.group_size == 32 and int4.targets == ("Linear",)
    assert int4.ignore == tuple(KIMI_K2_THINKING_INT4["ignore"])
    with pytest.raises(AttributeError):
        int4.group_size = 64  # frozen


def test_schemes_validate_on_construction():
    assert Fp8BlockScheme(block=[64, 32]).block == (64, 32)
    with pytest.raises(ValueError, match="block"):
        Fp8BlockScheme(block=(128, 0))
    with pytest.raises(ValueError, match="group_size"):
        Int4GroupScheme(group_size=0)
    with pytest.raises(ValueError, match="targets"):
        Int4GroupScheme(targets=())
    with pytest.raises(ValueError, match="ignore"):
        Int4GroupScheme(ignore="lm_head")


def test_to_hf_config_round_trips():
    for cfg in (DEEPSEEK_FP8, KIMI_K2_THINKING_INT4):
        scheme = parse_quant_config(cfg)
        assert parse_quant_config(scheme.to_hf_config()) == scheme
    scheme = Fp8BlockScheme(block=(64, 32), ignore=("model.layers.0.mlp.down_proj",))
    assert parse_quant_config(scheme.to_hf_config()) == scheme


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"quant_method": "awq"}, 'quantization_config.quant_method: "awq" is not supported'),
        ({}, "quantization_config.quant_method: missing"),
        ({**DEEPSEEK_FP8, "fmt": "e5m2"}, 'quantization_config.fmt: "e5m2" is not supported'),
        ({**DEEPSEEK_FP8, "activation_scheme": "static"}, "quantization_config.activation_scheme"),
        ({**DEEPSEEK_FP8, "weight_block_size": None}, f"{Q}.weight_block_size: missing"),
        ({**DEEPSEEK_FP8, "weight_block_size": [128]}, f"{Q}.weight_block_size: [128]"),
        ({**DEEPSEEK_FP8, "modules_to_not_convert": "lm_head"}, f"{Q}.modules_to_not_convert"),
        ({**KIMI_K2_THINKING_INT4, "format": "float-quantized"}, f'{Q}.format: "float-quantized"'),
        ({**KIMI_K2_THINKING_INT4, "kv_cache_scheme": {"num_bits": 8}}, f"{Q}.kv_cache_scheme"),
        ({**KIMI_K2_THINKING_INT4, "ignore": ["re:(("]}, f"{Q}.ignore[0]: invalid regex"),
        (
            _kimi(num_bits=8),
            f"{Q}.config_groups.group_0.weights.num_bits: 8 is not supported (only 4)",
        ),
        (_kimi(symmetric=False), "config_groups.group_0.weights.symmetric: false is not supported"),
        (_kimi(strategy="channel"), 'config_groups.group_0.weights.strategy: "channel"'),
        (_kimi(type="float"), 'config_groups.group_0.weights.type: "float"'),
        (_kimi(dynamic=True), "config_groups.group_0.weights.dynamic: true"),
        (_kimi(actorder="group"), "config_groups.group_0.weights.actorder"),
        (_kimi(group_size=0), "config_groups.group_0.weights.group_size: 0"),
    ],
)
def test_parse_rejects_with_field_path(cfg, message):
    with pytest.raises(UnsupportedQuantization) as err:
        parse_quant_config(cfg)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_parse_rejects_activation_quantization_and_mixed_groups():
    cfg = copy.deepcopy(KIMI_K2_THINKING_INT4)
    cfg["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    with pytest.raises(UnsupportedQuantization, match=r"config_groups\.group_0\.input_activations"):
        parse_quant_config(cfg)
    cfg = copy.deepcopy(KIMI_K2_THINKING_INT4)
    group_1 = copy.deepcopy(cfg["config_groups"]["group_0"])
    group_1["targets"] = ["re:.*experts.*"]
    group_1["weights"]["group_size"] = 64
    cfg["config_groups"]["group_1"] = group_1
    message = r"group_1\.weights\.group_size: 64 differs from group_0 \(32\)"
    with pytest.raises(UnsupportedQuantization, match=message):
        parse_quant_config(cfg)
    group_1["weights"]["group_size"] = 32  # same settings: targets merge
    assert parse_quant_config(cfg).targets == ("Linear", "re:.*experts.*")


@pytest.mark.parametrize(
    ("name", "fp8", "int4"),
    [
        ("model.layers.3.mlp.experts.7.down_proj", True, True),
        ("model.layers.60.mlp.experts.383.gate_proj", True, True),
        ("model.layers.0.self_attn.q_a_proj", True, False),
        ("model.layers.5.self_attn.kv_b_proj", True, False),
        ("model.layers.3.mlp.shared_experts.up_proj", True, False),
        ("model.layers.0.mlp.gate_proj", True, False),  # dense first layer
        ("model.layers.3.mlp.gate", False, False),  # router
        ("lm_head", False, False),
        ("model.layers.61.shared_head.head", False, True),  # MTP head (DeepSeek only)
    ],
)
def test_is_quantized_published_configs(name, fp8, int4):
    assert parse_quant_config(DEEPSEEK_FP8).is_quantized(name) is fp8
    assert parse_quant_config(KIMI_K2_THINKING_INT4).is_quantized(name) is int4


def test_is_quantized_targets_and_ignore_rules():
    scheme = Int4GroupScheme(
        group_size=32,
        targets=("re:.*experts.*", "model.layers.1.mlp.down_proj"),
        ignore=("model.layers.3.mlp.experts.0.up_proj", "re:model\\.layers\\.4\\."),
    )
    assert scheme.is_quantized("model.layers.3.mlp.experts.1.up_proj")
    assert scheme.is_quantized("model.layers.1.mlp.down_proj")  # plain target: exact name
    assert not scheme.is_quantized("model.layers.1.mlp.up_proj")  # no target matches
    assert not scheme.is_quantized("model.layers.3.mlp.experts.0.up_proj")  # plain ignore: exact
    assert scheme.is_quantized("model.layers.3.mlp.experts.0.up_proj_x")  # ...and only exact
    assert not scheme.is_quantized("model.layers.4.mlp.experts.0.up_proj")  # regex ignore
    assert scheme.is_quantized("xmodel.layers.4.mlp.experts.0.up_proj")  # re.match anchors at start

    fp8_cfg = {
        **DEEPSEEK_FP8,
        "modules_to_not_convert": ["kv_b_proj"],
        "ignored_layers": ["re:.*layers\\.0\\."],
    }
    fp8 = parse_quant_config(fp8_cfg)
    assert fp8.ignore == ("kv_b_proj", "re:.*layers\\.0\\.")
    assert not fp8.is_quantized("model.layers.5.self_attn.kv_b_proj")
    assert fp8.is_quantized("model.layers.5.self_attn.kv_b_proj_extra")  # whole components only
    assert not fp8.is_quantized("model.layers.0.mlp.down_proj")
    assert fp8.is_quantized("model.layers.10.mlp.down_proj")
