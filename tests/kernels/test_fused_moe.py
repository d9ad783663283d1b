"""Fused MoE kernels (kernels/fused_moe.py) against their torch references.

On the CPU these run under Triton's interpreter at small shapes, fp32 and fp16 activations only
(the interpreter computes bf16 tl.dot wrongly); INT4 scales are bf16 as in the checkpoint. Every
output buffer is poisoned with NaN before the launch, so an unwritten element fails the test.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moecluster.kernels import fused_moe as fm
from moecluster.workers.quant.int4 import dequantize_int4_group, pack_int4, unpack_int4

# Small explicit tiles keep the interpreter fast and exercise masking: BLOCK_N 32 does not divide
# I = 48 (dense), BLOCK_N 64 does not divide I = 96 (INT4, gate_up); BLOCK_K 32 or the INT4 k_block
# 128 does not divide H = 96 / 64, and experts with more rows than BLOCK_M = 16 span several blocks.
SMALL = dict(gate_up_tiles=fm.TileConfig(16, 32, 32), down_tiles=fm.TileConfig(16, 32, 32))
SMALL_INT4 = dict(gate_up_tiles=fm.TileConfig(16, 64, None), down_tiles=fm.TileConfig(32, 32, None))


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _dense(e: int, h: int, i: int, dtype: torch.dtype, device: torch.device) -> fm.DenseExperts:
    gate = torch.randn(e, i, h, device=device) / h**0.5
    up = torch.randn(e, i, h, device=device) / h**0.5
    down = torch.randn(e, h, i, device=device) / i**0.5
    return fm.DenseExperts(gate.to(dtype), up.to(dtype), down.to(dtype))


def _int4_ckpt(e: int, out_f: int, in_f: int, device: torch.device, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Random checkpoint-format (weight_packed, weight_scale): q uniform in [-8, 7], scales > 0."""
    q = torch.randint(-8, 8, (e, out_f, in_f), dtype=torch.int8, device=device)
    scale = (torch.rand(e, out_f, in_f // group, device=device) + 0.5) / (4.0 * in_f**0.5)
    return pack_int4(q), scale.to(torch.bfloat16)


def _int4(e: int, h: int, i: int, device: torch.device, k_block: int | None = 128) -> tuple[fm.Int4Experts, dict]:
    ckpt = {name: _int4_ckpt(e, *shape, device) for name, shape in (("gate", (i, h)), ("up", (i, h)), ("down", (h, i)))}
    w = fm.Int4Experts.from_compressed_tensors(ckpt["gate"], ckpt["up"], ckpt["down"], h, i, k_block=k_block)
    return w, ckpt


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _check_grouped(x, counts, weights, dtype, device, **tiles) -> None:  # noqa: ANN001
    out = _poisoned((x.shape[0], x.shape[1]), dtype, device)
    got = fm.grouped_mlp(x, torch.tensor(counts, device=device), weights, out=out, **tiles)
    assert got.data_ptr() == out.data_ptr()
    ref = fm.grouped_mlp_reference(x, counts, weights)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, ref, **_tol(dtype))


# ---- repack ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("out_f", "in_f", "k_block"), [(48, 64, 128), (32, 96, 128), (16, 256, 128), (8, 160, 256)])
def test_repack_round_trip_and_dequant(device: torch.device, out_f: int, in_f: int, k_block: int) -> None:
    packed, scale = _int4_ckpt(3, out_f, in_f, device)
    w = fm.repack_int4(packed, scale, out_f, in_f, k_block=k_block)
    k_pad = -(-in_f // k_block) * k_block
    assert w.packed.shape == (3, k_pad // 8, out_f) and w.scale.shape == (3, k_pad // 32, out_f)
    assert w.packed.is_contiguous() and w.scale.dtype == torch.bfloat16
    back_packed, back_scale = fm.unrepack_int4(w)
    assert torch.equal(back_packed, packed) and torch.equal(back_scale, scale)
    want = dequantize_int4_group(packed, scale, 32, in_f, torch.float32)
    assert torch.equal(fm.dequantize_int4(w, torch.float32), want)


def test_repack_in_expert_chunks_equals_one_pass(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large expert stacks are repacked a few experts at a time (bounded temporaries): same words."""
    from moecluster.kernels import moe_weights

    packed, scale = _int4_ckpt(7, 32, 128, device)
    whole = fm.repack_int4(packed, scale, 32, 128)
    monkeypatch.setattr(moe_weights, "REPACK_TEMP_BYTES", 2 * 32 * 128 * 8)  # two experts per chunk
    chunked = fm.repack_int4(packed, scale, 32, 128)
    assert torch.equal(chunked.packed, whole.packed) and torch.equal(chunked.scale, whole.scale)


def test_repack_layout_hand_built(device: torch.device) -> None:
    """Word row b*P + j of the kernel layout holds input b*k_block + s*P + j in nibble s."""
    in_f, p = 256, 16
    q = (torch.arange(in_f, device=device) % 16 - 8).to(torch.int8).reshape(1, in_f)  # q[k] = k % 16 - 8
    w = fm.repack_int4(pack_int4(q), torch.ones(1, in_f // 32, device=device), 1, in_f)
    words = w.packed[0, :, 0]  # (32,)
    for row in range(in_f // 8):
        b, j = divmod(row, p)
        nibbles = [(int(words[row]) >> (4 * s)) & 0xF for s in range(8)]
        assert nibbles == [(b * 128 + s * p + j) % 16 for s in range(8)]
    assert torch.equal(unpack_int4(fm.unrepack_int4(w)[0][0], in_f), q)


def test_repack_rejects_bad_input(device: torch.device) -> None:
    packed, scale = _int4_ckpt(1, 16, 64, device)
    with pytest.raises(ValueError, match="weight_packed"):
        fm.repack_int4(packed, scale, 16, 128)
    with pytest.raises(ValueError, match="weight_scale"):
        fm.repack_int4(packed, scale[..., :1], 16, 64)
    with pytest.raises(ValueError, match="k_block"):
        fm.repack_int4(packed, scale, 16, 64, k_block=512)  # sub-tile of 64 inputs spans two groups
    # 2-D (a single matrix) becomes E = 1; K = 64 padded to the default k_block (256 for group 32)
    assert fm.repack_int4(packed[0], scale[0], 16, 64).packed.shape == (1, 256 // 8, 16)
    assert fm.repack_int4(packed[0], scale[0], 16, 64, k_block=128).packed.shape == (1, 16, 16)


# ---- grouped MLP, dense ------------------------------------------------------------------------

GROUPED_CASES = [
    # (E, H, I, counts): zeros, experts over BLOCK_M = 16 rows, rows 1 to 70
    (1, 64, 32, [1]),
    (3, 64, 96, [5, 0, 37]),
    (8, 128, 48, [0, 3, 17, 0, 1, 9, 0, 40]),
    (4, 96, 64, [0, 0, 0, 2]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("e", "h", "i", "counts"), GROUPED_CASES)
def test_grouped_mlp_dense(device: torch.device, dtype: torch.dtype, e: int, h: int, i: int, counts: list[int]) -> None:
    weights = _dense(e, h, i, dtype, device)
    x = torch.randn(sum(counts), h, device=device).to(dtype)
    _check_grouped(x, counts, weights, dtype, device, **SMALL)


def test_grouped_mlp_dense_default_tiles_and_strided_weights(device: torch.device) -> None:
    """Default tiles (BLOCK_K 128 > H: masked K), gate/up as halves of one (E, 2I, H) tensor, a
    transposed-storage down weight, and counts given as a list."""
    e, h, i, counts = 2, 64, 80, [19, 30]
    gate_up = torch.randn(e, 2 * i, h, device=device) / h**0.5
    down = (torch.randn(e, i, h, device=device) / i**0.5).transpose(1, 2)  # (E, H, I), I-major storage
    weights = fm.DenseExperts(gate_up[:, :i], gate_up[:, i:], down)
    x = torch.randn(sum(counts), h, device=device)
    out = _poisoned((x.shape[0], h), torch.float32, device)
    got = fm.grouped_mlp(x, counts, weights, out=out)
    torch.testing.assert_close(got, fm.grouped_mlp_reference(x, counts, weights), **_tol(torch.float32))


@pytest.mark.parametrize("group_m", [1, 2, 3, 64])
def test_grouped_mlp_grouped_launch_order(device: torch.device, group_m: int) -> None:
    """Programs launched in groups of group_m m-blocks (the prefill order): every (m-block,
    n-block) pair still runs once, including a last group smaller than group_m and a group_m
    above the number of m-blocks."""
    e, h, i, counts = 4, 64, 96, [40, 0, 3, 21]  # 3 + 1 + 2 m-blocks of 16 (7 in the bound), 3 n-blocks of 32
    tiles = dict(gate_up_tiles=fm.TileConfig(16, 32, 32, group_m=group_m),
                 down_tiles=fm.TileConfig(16, 32, 32, group_m=group_m))
    # one expert of 80 rows: no slack in the m-block bound, so the last (partial) group holds real rows
    one = _dense(1, h, i, torch.float32, device)
    _check_grouped(torch.randn(80, h, device=device), [80], one, torch.float32, device, **tiles)
    for weights in (_dense(e, h, i, torch.float32, device), _int4(e, h, i, device)[0]):
        x = torch.randn(sum(counts), h, device=device)
        if isinstance(weights, fm.Int4Experts):
            tiles = {k: fm.TileConfig(16, 32, None, group_m=group_m) for k in tiles}
        _check_grouped(x, counts, weights, torch.float32, device, **tiles)
    with pytest.raises(ValueError, match="group_m"):
        fm.grouped_mlp(x, counts, _dense(e, h, i, torch.float32, device), gate_up_tiles=fm.TileConfig(16, 32, 32, group_m=-1))


def test_grouped_mlp_gathers_rows_and_leaves_uncounted_rows(device: torch.device) -> None:
    """src_rows: grouped row r reads x[src_rows[r]]; rows past sum(counts) stay untouched."""
    e, h, i = 3, 64, 32
    weights = _dense(e, h, i, torch.float32, device)
    x = torch.randn(10, h, device=device)
    src = torch.randint(0, 10, (25,), device=device)
    counts = [7, 0, 10]  # 17 of 25 rows; the last block (rows 7..22) must stop at row 17
    out = _poisoned((25, h), torch.float32, device)
    fm.grouped_mlp(x, torch.tensor(counts, device=device), weights, src_rows=src, out=out, **SMALL)
    ref = fm.grouped_mlp_reference(x[src], counts, weights)
    torch.testing.assert_close(out[:17], ref[:17], **_tol(torch.float32))
    assert torch.isnan(out[17:]).all()


def test_grouped_mlp_empty_and_errors(device: torch.device) -> None:
    weights = _dense(2, 64, 32, torch.float32, device)
    assert fm.grouped_mlp(torch.empty(0, 64, device=device), [0, 0], weights).shape == (0, 64)
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="features"):
        fm.grouped_mlp(torch.randn(4, 32, device=device), [4, 0], weights)
    with pytest.raises(ValueError, match="counts"):
        fm.grouped_mlp(x, [4], weights)
    with pytest.raises(ValueError, match="out"):
        fm.grouped_mlp(x, [4, 0], weights, out=torch.empty(4, 64, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="block_n"):
        fm.grouped_mlp(x, [4, 0], weights, gate_up_tiles=fm.TileConfig(16, 48, 32))
    with pytest.raises(ValueError, match="DenseExperts"):
        fm.DenseExperts(weights.gate, weights.up, weights.gate)


# ---- grouped MLP, INT4 -------------------------------------------------------------------------


@pytest.mark.parametrize("stack", [1, 2, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("e", "h", "i", "counts"), [(3, 64, 96, [5, 0, 37]), (8, 128, 32, [0, 3, 17, 0, 1, 9, 0, 40])])
def test_grouped_mlp_int4(device: torch.device, dtype: torch.dtype, e: int, h: int, i: int, counts: list[int],
                          stack: int) -> None:
    """stack: sub-tiles of 16 inputs unpacked into one tile per dot (8: a whole packed block of 128)."""
    weights, ckpt = _int4(e, h, i, device)
    x = torch.randn(sum(counts), h, device=device).to(dtype)
    tiles = {k: dataclasses.replace(t, int4_stack=stack) for k, t in SMALL_INT4.items()}
    _check_grouped(x, counts, weights, dtype, device, **tiles)
    # the reference's weights are the checkpoint's, dequantized independently
    ref_gate = dequantize_int4_group(*ckpt["gate"], 32, h, dtype)
    assert torch.equal(fm.expert_weights_dense(weights, dtype)[0], ref_gate)


@pytest.mark.parametrize("stack", [1, 4, 8])
def test_grouped_mlp_int4_k_block_256_and_block_k_512(device: torch.device, stack: int) -> None:
    """k_block 256 (sub-tiles of 32 inputs = one group) and BLOCK_K spanning two packed blocks."""
    e, h, i, counts = 2, 288, 64, [3, 21]
    weights, _ = _int4(e, h, i, device, k_block=256)
    x = torch.randn(sum(counts), h, device=device, dtype=torch.float16)
    tiles = dict(gate_up_tiles=fm.TileConfig(16, 64, 512, int4_stack=stack),
                 down_tiles=fm.TileConfig(32, 32, 256, int4_stack=stack))
    _check_grouped(x, counts, weights, torch.float16, device, **tiles)
    with pytest.raises(ValueError, match="k_block"):
        fm.grouped_mlp(x, counts, weights, gate_up_tiles=fm.TileConfig(16, 32, 128))
    with pytest.raises(ValueError, match="int4_stack"):
        fm.grouped_mlp(x, counts, weights, gate_up_tiles=fm.TileConfig(16, 32, 256, int4_stack=3))


def test_grouped_mlp_int4_default_tiles(device: torch.device) -> None:
    """Decode-sized counts: the default INT4 tiles step K two packed blocks at a time."""
    e, h, i, counts = 2, 256, 256, [3, 9]
    weights, _ = _int4(e, h, i, device)
    assert fm.default_tiles(sum(counts), weights)[0].block_k == 256
    x = torch.randn(sum(counts), h, device=device, dtype=torch.float16)
    _check_grouped(x, counts, weights, torch.float16, device)


@pytest.mark.parametrize("counts", [[3, 9], [40, 70]])
def test_grouped_mlp_int4_library_default_repack_and_tiles(device: torch.device, counts: list[int]) -> None:
    """The default repack (k_block 256 for group 32: sub-tiles of 32 inputs) with the default tiles:
    one sub-tile per dot at decode sizes, four stacked per dot above 32 rows per expert (here 55)."""
    e, h, i = 2, 256, 96
    weights, _ = _int4(e, h, i, device, k_block=None)
    assert weights.gate.k_block == 256 and weights.down.packed.shape[1] == 256 // 8  # I = 96 padded to 256
    gu, _ = fm.default_tiles(sum(counts), weights, torch.float16)
    assert gu.block_k == 256 and gu.int4_stack == (1 if max(counts) < 64 else 4)
    x = torch.randn(sum(counts), h, device=device, dtype=torch.float16)
    _check_grouped(x, counts, weights, torch.float16, device)


@pytest.mark.parametrize("k_block", [None, 256])
def test_grouped_mlp_int4_group_96_pads_k_to_whole_groups(device: torch.device, k_block: int | None) -> None:
    """A group size that does not nest with the packed block (96 vs 128 / 256): K is padded to
    whole blocks AND whole groups (a scale row per padded group), else the kernel would read
    scale rows past the tensor. The default k_block for 96 is 128."""
    e, h, i, g, counts = 2, 288, 96, 96, [3, 20]
    gate, up, down = (_int4_ckpt(e, o, k, device, group=g) for o, k in ((i, h), (i, h), (h, i)))
    weights = fm.Int4Experts.from_compressed_tensors(gate, up, down, h, i, group_size=g, k_block=k_block)
    kb = weights.gate.k_block
    assert kb == (128 if k_block is None else 256)
    k_pad = weights.gate.packed.shape[1] * 8
    assert k_pad % kb == 0 and k_pad % g == 0 and weights.gate.scale.shape[1] == k_pad // g
    x = torch.randn(sum(counts), h, device=device, dtype=torch.float16)
    _check_grouped(x, counts, weights, torch.float16, device)


# ---- full fused MoE ----------------------------------------------------------------------------


def _per_token_reference(hidden, topk_ids, topk_weights, gate, up, down):  # noqa: ANN001, ANN202
    """One token and one slot at a time, weights given dense (E, ., .)."""
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for t in range(hidden.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            x = hidden[t : t + 1].float()
            hmid = (torch.nn.functional.silu(x @ gate[e].float().T) * (x @ up[e].float().T)).to(hidden.dtype)
            y = (hmid.float() @ down[e].float().T).to(hidden.dtype)
            out[t] += float(topk_weights[t, j]) * y[0].float()
    return out.to(hidden.dtype)


@pytest.mark.parametrize(
    ("fmt", "dtype", "e", "t", "k"),
    [
        ("dense", torch.float32, 4, 9, 2),
        ("dense", torch.float16, 8, 13, 3),
        ("int4", torch.float16, 6, 7, 4),
        ("int4", torch.float32, 5, 11, 2),
    ],
)
def test_fused_moe(device: torch.device, fmt: str, dtype: torch.dtype, e: int, t: int, k: int) -> None:
    h, i = 64, 96
    if fmt == "dense":
        weights = _dense(e, h, i, dtype, device)
        gate, up, down = weights.gate, weights.up, weights.down
        tiles = SMALL
    else:
        weights, ckpt = _int4(e, h, i, device)
        shapes = (("gate", h), ("up", h), ("down", i))
        gate, up, down = (dequantize_int4_group(*ckpt[n], 32, k_in, dtype) for n, k_in in shapes)
        tiles = SMALL_INT4
    hidden = torch.randn(t, h, device=device).to(dtype)
    # distinct experts per token; expert 0 never chosen (an empty expert)
    topk_ids = torch.stack([torch.randperm(e - 1, device=device)[:k] + 1 for _ in range(t)])
    topk_weights = torch.softmax(torch.randn(t, k, device=device), dim=-1)
    out = _poisoned((t, h), dtype, device)
    got = fm.fused_moe(hidden, topk_ids, topk_weights, weights, out=out, **tiles)
    assert got.data_ptr() == out.data_ptr()
    want = _per_token_reference(hidden, topk_ids, topk_weights, gate, up, down)
    torch.testing.assert_close(got, want, **_tol(dtype))
    torch.testing.assert_close(fm.fused_moe_reference(hidden, topk_ids, topk_weights, weights), want, **_tol(dtype))


def test_fused_moe_many_tokens_one_expert_default_tiles(device: torch.device) -> None:
    """All 70 tokens pick expert 1 in some slot: one expert with several row blocks."""
    e, h, i, t = 3, 64, 32, 35
    weights = _dense(e, h, i, torch.float32, device)
    hidden = torch.randn(t, h, device=device)
    ones = torch.ones(t, dtype=torch.long, device=device)
    topk_ids = torch.stack([ones, torch.randint(0, e, (t,), device=device)], 1)
    topk_weights = torch.rand(t, 2, device=device)
    got = fm.fused_moe(hidden, topk_ids, topk_weights, weights)
    want = _per_token_reference(hidden, topk_ids, topk_weights, weights.gate, weights.up, weights.down)
    torch.testing.assert_close(got, want, **_tol(torch.float32))


def test_cpu_path_without_triton_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "uses_triton", lambda t: False)
    weights, _ = _int4(2, 64, 32, torch.device("cpu"))
    x = torch.randn(5, 64)
    assert torch.equal(fm.grouped_mlp(x, [2, 3], weights), fm.grouped_mlp_reference(x, [2, 3], weights))
    ids, wts = torch.tensor([[0, 1], [1, 0]]), torch.rand(2, 2)
    assert torch.equal(fm.fused_moe(x[:2], ids, wts, weights), fm.fused_moe_reference(x[:2], ids, wts, weights))


# ---- GPU, DeepSeek-V3 expert shape -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["dense", "int4", "int4-k128"])
def test_grouped_mlp_deepseek_shape_bf16(fmt: str) -> None:
    """int4: the library's default repack (k_block 256) and tiles; int4-k128: sub-tiles of 16."""
    device = torch.device("cuda")
    e, h, i, rows_each = 8, 7168, 2048, 64
    torch.manual_seed(0)
    if fmt == "dense":
        weights = _dense(e, h, i, torch.bfloat16, device)
    else:
        weights, _ = _int4(e, h, i, device, k_block=128 if fmt == "int4-k128" else None)
    counts = [rows_each] * e
    x = torch.randn(e * rows_each, h, device=device, dtype=torch.bfloat16)
    out = _poisoned((x.shape[0], h), torch.bfloat16, device)
    got = fm.grouped_mlp(x, torch.tensor(counts, device=device), weights, out=out)
    ref = fm.grouped_mlp_reference(x, counts, weights)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)
    assert (got.float() - ref.float()).norm() / ref.float().norm() < 1e-2
    # and the top-k path at the same shape, decode-sized (16 tokens, top-8 of 8)
    hidden = x[:16]
    ids = torch.stack([torch.randperm(e, device=device) for _ in range(16)])
    wts = torch.softmax(torch.randn(16, e, device=device), dim=-1)
    got = fm.fused_moe(hidden, ids, wts, weights)
    ref = fm.fused_moe_reference(hidden, ids, wts, weights)
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("k_block", "stack"), [(128, 1), (128, 4), (128, 8), (256, 1), (256, 4)])
@pytest.mark.parametrize("rows_each", [5, 64])
def test_int4_ptx_dequant_equals_the_scalar_path(dtype: torch.dtype, k_block: int, stack: int, rows_each: int) -> None:
    """The inline-PTX pair dequantization (sm_90) gives the same weights as the scalar magic path:
    the same tiles with int4_ptx on and off give the same output, bit for bit; I = 352 leaves a
    partial n-block (masked columns) at BLOCK_N 64."""
    device = torch.device("cuda")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the PTX dequantization needs sm_90")
    e, h, i = 4, 512, 352
    weights, _ = _int4(e, h, i, device, k_block=k_block)
    counts = torch.tensor([rows_each, rows_each + 3, 0, 2 * rows_each], device=device)
    x = torch.randn(int(counts.sum()), h, device=device, dtype=dtype)
    outs = []
    for ptx in (True, False):
        gu = fm.TileConfig(64 if rows_each > 16 else 16, 64, None, 4, 2, int4_stack=stack, int4_ptx=ptx)
        outs.append(fm.grouped_mlp(x, counts, weights, gate_up_tiles=gu, down_tiles=gu,
                                   out=_poisoned((x.shape[0], h), dtype, device)))
    assert not torch.isnan(outs[0]).any()
    assert torch.equal(outs[0], outs[1])
    ref = fm.grouped_mlp_reference(x, counts.tolist(), weights)
    torch.testing.assert_close(outs[0], ref, atol=3e-2, rtol=3e-2)
