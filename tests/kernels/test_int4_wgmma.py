"""The Gluon INT4 kernel (kernels/int4_wgmma.py): its PTX against the repack's layout and the reference's
dequantization (on the CPU, by executing the PTX step by step), its dispatch rules, and on a Hopper GPU its outputs
against the Triton kernel and the reference, and inside a CUDA graph.

The two kernels dequantize to the same weights and add the same 16-deep tensor-core products in the
same order into fp32, so their outputs are expected to be equal bit for bit (the H100 sweep of
`scripts/time_int4_wgmma.py` found them equal at DeepSeek-V3 shapes); the GPU test asserts that."""

from __future__ import annotations

import pytest
import torch

from moecluster.kernels import fused_moe as fm
from moecluster.kernels import int4_wgmma as iw
from moecluster.workers.quant.int4 import pack_int4

pytestmark = pytest.mark.skipif(iw.gluon is None, reason="this Triton has no Gluon")


def _halves(bits: int, dtype: torch.dtype) -> list[float]:
    """The two 16-bit halves of a 32-bit register as numbers of dtype (low half first)."""
    return torch.tensor([bits & 0xFFFF, bits >> 16], dtype=torch.int32).to(torch.int16).view(dtype).double().tolist()


def _pack(values: list[float], dtype: torch.dtype) -> int:
    """Two numbers, each rounded once to dtype (exact in fp32 first), as one 32-bit register."""
    lo, hi = (int(v) & 0xFFFF for v in torch.tensor(values, dtype=torch.float32).to(dtype).view(torch.int16).tolist())
    return lo | (hi << 16)


def _run_nibble_asm(asm: str, word_a: int, word_b: int, scale_bits: int, dtype: torch.dtype) -> int:
    """Execute `_nibble_asm`'s PTX on two words and a packed scale pair -> the packed result register.
    Integer steps bit for bit; each packed float step computed exactly (the operands' products fit a
    double) and rounded once to dtype, as the `.rn` instructions do."""
    regs = {"$1": word_a, "$2": word_b, "$3": scale_bits}
    body = asm[asm.index(";") + 1 : asm.rindex("}")]  # after the .reg declaration
    for ins in filter(None, (x.strip() for x in body.split(";"))):
        op, args = ins.split(None, 1)
        a = [x.strip() for x in args.split(",")]
        val = [regs[x] if x in regs else int(x, 16) for x in a[1:]]
        if op == "prmt.b32":  # bytes 0-3 from the first operand, 4-7 from the second
            source = val[0].to_bytes(4, "little") + val[1].to_bytes(4, "little")
            out = int.from_bytes(bytes(source[(val[2] >> (4 * i)) & 0x7] for i in range(4)), "little")
        elif op == "shr.u32":
            out = val[0] >> val[1]
        elif op == "mov.b32":
            out = val[0]
        elif op == "lop3.b32":  # bit i of the result is bit (a_i b_i c_i, as a 3-bit number) of the table
            x, y, z, lut = val
            out = sum(((lut >> (4 * ((x >> i) & 1) + 2 * ((y >> i) & 1) + ((z >> i) & 1))) & 1) << i for i in range(32))
        else:
            h = [_halves(v, dtype) for v in val]
            kind = op.split(".")[0]
            if kind == "sub":
                out = _pack([h[0][i] - h[1][i] for i in range(2)], dtype)
            elif kind == "mul":
                out = _pack([h[0][i] * h[1][i] for i in range(2)], dtype)
            elif kind == "fma":
                out = _pack([h[0][i] * h[1][i] + h[2][i] for i in range(2)], dtype)
            else:
                raise AssertionError(f"unexpected instruction {ins!r}")
        regs[a[0]] = out & 0xFFFFFFFF
    return regs["$0"]


@pytest.mark.parametrize(("magic", "packed", "dtype"), [(fm._MAGIC[torch.bfloat16][0], "bf16x2", torch.bfloat16),
                                                        (fm._MAGIC[torch.float16][0], "f16x2", torch.float16)])
def test_nibble_asm_takes_nibble_s_of_each_word(magic: int, packed: str, dtype: torch.dtype) -> None:
    """For every nibble position s the PTX, executed step by step, gives (nibble s of word A - 8) x
    scale in the low half and (nibble s of word B - 8) x scale in the high half, each rounded once
    to the 16-bit type: the reference's dequantization."""
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (48, 2), generator=gen, dtype=torch.int64).tolist()
    scales = (torch.rand(48, 2, generator=gen) * 0.05 + 1e-3).to(dtype)
    for s in range(8):
        asm = iw._nibble_asm(s, magic, packed)
        assert f"mul.rn.{packed} $0, %wt, $3;" in asm
        for (a, b), sc in zip(words, scales, strict=True):
            sc_bits = _pack(sc.double().tolist(), dtype)
            got = _halves(_run_nibble_asm(asm, a, b, sc_bits, dtype), dtype)
            qa, qb = ((a >> (4 * s)) & 0xF) - 8, ((b >> (4 * s)) & 0xF) - 8
            want = _halves(_pack([qa * sc[0].item(), qb * sc[1].item()], dtype), dtype)
            assert got == want, (s, hex(a), hex(b), got, want)


def test_nibble_s_is_the_repack_sub_tile_s() -> None:
    """The repack (moe_weights.py) puts input s * 32 + j of a k_block in nibble s of word row j, which
    is what the kernel's sub-tile s reads: nibble s of word rows 0..31 holds inputs s * 32 .. + 31."""
    out_f, in_f = 8, 512
    q = torch.randint(-8, 8, (1, out_f, in_f), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    w = fm.repack_int4(pack_int4(q), torch.ones(1, out_f, in_f // 32, dtype=torch.bfloat16), out_f, in_f)
    assert w.k_block == iw.K_BLOCK
    packed = w.packed[0].to(torch.int64) & 0xFFFFFFFF  # (K_pad / 8, N)
    for kb in range(in_f // iw.K_BLOCK):
        rows = packed[kb * 32 : (kb + 1) * 32]  # (32, N) the words of one k_block
        for s in range(8):
            first = kb * iw.K_BLOCK + s * 32
            assert torch.equal(((rows >> (4 * s)) & 0xF) - 8, q[0, :, first : first + 32].T.to(torch.int64))


@pytest.mark.parametrize("rows_per_expert", [1, 8, 16, 17, 32, 33, 64, 512, 4096])
@pytest.mark.parametrize("gated", [True, False])
def test_default_tiles_are_valid(rows_per_expert: float, gated: bool) -> None:
    iw.check_tiles(iw.default_tiles(rows_per_expert, gated))


def test_not_used_on_cpu_or_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    a = torch.zeros(4, 256, dtype=torch.bfloat16)
    packed, scale = torch.zeros(1, 32, 64, dtype=torch.int32), torch.zeros(1, 8, 64, dtype=torch.bfloat16)
    assert not iw.supported(a, packed, scale, 256, torch.zeros(4, 64, dtype=torch.bfloat16))
    monkeypatch.setenv("MOECLUSTER_INT4_GLUON", "0")
    assert not iw.enabled()
    monkeypatch.setenv("MOECLUSTER_INT4_GLUON", "1")
    assert iw.enabled()


def test_a_failed_launch_falls_back_to_triton_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Gluon compile / launch failure (another Triton's Gluon) is warned once; from then on every INT4
    GEMM goes to the Triton kernel (grouped_gemm returns False without trying)."""
    calls = []

    def failing_launch(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        calls.append(1)
        raise RuntimeError("gluon: unsupported")

    monkeypatch.setattr(iw, "supported", lambda *a: True)
    monkeypatch.setattr(iw, "launch", failing_launch)
    monkeypatch.setattr(iw, "_FAILED", False)
    weights = _int4_weights(2, 256, 64, torch.bfloat16, torch.device("cpu"))
    a, c = torch.zeros(4, 256, dtype=torch.bfloat16), torch.zeros(4, 64, dtype=torch.bfloat16)
    counts = torch.tensor([3, 1])
    with pytest.warns(RuntimeWarning, match="Gluon INT4 kernel failed"):
        assert not iw.grouped_gemm(a, None, counts, weights, True, c, 0x4300)
    assert not iw.grouped_gemm(a, None, counts, weights, True, c, 0x4300)
    assert len(calls) == 1


def test_tma_loads_where_tma_can_take_them() -> None:
    """Grouped activations and the words go by TMA from TMA_MIN_ROWS rows a program; gathered rows, K
    not a whole number of sub-tiles and strides or bases TMA cannot take keep cp.async."""
    a = torch.zeros(70, 7168, dtype=torch.bfloat16)
    bt = iw.TMA_MIN_ROWS
    assert iw.x_tma_ok(a, None, 7168, bt) and iw.x_tma_ok(a, None, 7168, 64)
    assert not iw.x_tma_ok(a, None, 7168, 16)  # decode tiles
    assert not iw.x_tma_ok(a, torch.arange(70), 7168, bt)  # gathered rows
    assert not iw.x_tma_ok(a[:, :7160], None, 7160, bt)  # K % 32 != 0
    assert not iw.x_tma_ok(torch.zeros(70, 7172, dtype=torch.bfloat16)[:, :7168], None, 7168, bt)  # 8-byte row stride
    assert not iw.x_tma_ok(a.view(-1)[4:4 + 69 * 7168].view(69, 7168), None, 7168, bt)  # 8-byte aligned base
    w = torch.zeros(4, 32, 64, dtype=torch.int32)
    assert iw.w_tma_ok(w, w, bt)
    assert not iw.w_tma_ok(w, w, 16)
    odd = torch.zeros(4, 32, 66, dtype=torch.int32)[:, :, :64]  # rows of 264 bytes
    assert not iw.w_tma_ok(w, odd, bt)
    assert not iw.w_tma_ok(torch.zeros(4 * 32 * 64 + 1, dtype=torch.int32)[1:].view(4, 32, 64), w, bt)  # base + 4 bytes


def test_launch_rejects_bad_tiles() -> None:
    a = torch.zeros(4, 256, dtype=torch.bfloat16)
    w, s = torch.zeros(1, 32, 64, dtype=torch.int32), torch.zeros(1, 8, 64, dtype=torch.bfloat16)
    counts = torch.tensor([4], dtype=torch.int32)
    for bad in (iw.WgmmaTiles(block_t=48), iw.WgmmaTiles(block_n=96), iw.WgmmaTiles(num_warps=2), iw.WgmmaTiles(stages=1)):
        with pytest.raises(ValueError, match="int4_wgmma"):
            iw.launch(a, None, counts, w, s, w, s, torch.zeros(4, 64, dtype=torch.bfloat16), 4, 64, 256, True, 32,
                      fm._MAGIC[torch.bfloat16][0], bad)


# ---- on a Hopper GPU --------------------------------------------------------------------------


def _hopper() -> torch.device:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel runs on sm_90 only")
    return torch.device("cuda")


def _int4_weights(e: int, h: int, i: int, dtype: torch.dtype, device: torch.device, group: int = 32) -> fm.Int4Experts:
    gen = torch.Generator(device=device).manual_seed(e * h + i)

    def ckpt(out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.randint(-8, 8, (e, out_f, in_f), dtype=torch.int8, device=device, generator=gen)
        scale = (torch.rand(e, out_f, in_f // group, device=device, generator=gen) + 0.5) / (4.0 * in_f**0.5)
        return pack_int4(q), scale.to(dtype)

    return fm.Int4Experts.from_compressed_tensors(ckpt(i, h), ckpt(i, h), ckpt(h, i), h, i, group_size=group)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("h", "i", "group"), [(512, 352, 32), (320, 256, 32), (7168, 2048, 32), (1024, 512, 128)])
@pytest.mark.parametrize("rows_each", [5, 20, 30, 64, 150, 200])
def test_gluon_equals_triton(dtype: torch.dtype, h: int, i: int, group: int, rows_each: int,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Default tiles (the Gluon kernel, checked to have run) against explicit Triton tiles (the Triton
    kernel), contiguous and gathered rows: equal bit for bit, and close to the reference; I = 352 and
    H = 320 leave partial column blocks and a partial k_block; one expert has no rows; the row
    counts reach every default tile (mean rows per expert 4 to 151); group 128 scales."""
    device = _hopper()
    e = 6
    weights = _int4_weights(e, h, i, dtype, device, group)
    launches = []
    real_launch = iw.launch
    monkeypatch.setattr(iw, "launch", lambda *args: launches.append(args[-1]) or real_launch(*args))
    counts = torch.tensor([rows_each, rows_each + 3, 0, 2 * rows_each, 1, rows_each // 2], device=device)
    x = torch.randn(int(counts.sum()) + 7, h, device=device, dtype=dtype)
    src = torch.randperm(x.shape[0], device=device)[: int(counts.sum())]
    gu, dn = fm.default_tiles(int(counts.sum()), weights, dtype)
    for rows in (None, src):
        xs = x[: int(counts.sum())] if rows is None else x
        got = fm.grouped_mlp(xs, counts, weights, src_rows=rows,
                             out=torch.full((int(counts.sum()), h), float("nan"), device=device, dtype=dtype))
        tri = fm.grouped_mlp(xs, counts, weights, src_rows=rows, gate_up_tiles=gu, down_tiles=dn)
        ref = fm.grouped_mlp_reference(xs, counts.tolist(), weights, src_rows=rows)
        assert len(launches) == 2  # gate_up and down both ran in Gluon
        launches.clear()
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got, ref, atol=3e-2, rtol=3e-2)
        assert torch.equal(got, tri)


@pytest.mark.gpu
@pytest.mark.parametrize(("h", "i"), [(7168, 2048), (320, 352)])
def test_tma_loads_equal_cp_async(h: int, i: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same tiles with the activations and words by TMA and by cp.async: equal bit for bit (partial
    column blocks, a partial k_block, rows of the next expert and past the end inside a box)."""
    device = _hopper()
    e = 5
    weights = _int4_weights(e, h, i, torch.bfloat16, device)
    counts = torch.tensor([70, 33, 0, 64, 41], device=device)
    x = torch.randn(int(counts.sum()), h, device=device, dtype=torch.bfloat16)
    seen = []  # (which load, by TMA) for every launch: a failed launch would fall back to Triton unseen
    real_x, real_w = iw.x_tma_ok, iw.w_tma_ok
    monkeypatch.setattr(iw, "x_tma_ok", lambda *args: seen.append(("x", real_x(*args))) or seen[-1][1])
    monkeypatch.setattr(iw, "w_tma_ok", lambda *args: seen.append(("w", real_w(*args))) or seen[-1][1])
    monkeypatch.setattr(iw, "_FAILED", False)
    tma = fm.grouped_mlp(x, counts, weights)
    assert not iw._FAILED and sorted(seen) == [("w", True), ("w", True), ("x", True), ("x", True)]
    seen.clear()
    monkeypatch.setattr(iw, "TMA_MIN_ROWS", 1 << 20)
    cp_async = fm.grouped_mlp(x, counts, weights)
    assert not iw._FAILED and sorted(seen) == [("w", False), ("w", False), ("x", False), ("x", False)]
    assert torch.equal(cp_async, tma)


@pytest.mark.gpu
@pytest.mark.parametrize(("before", "after", "tma"), [
    ([3, 0, 9, 1, 4, 4, 2, 7], [0, 5, 5, 5, 5, 5, 5, 0], False),  # decode sizes: 16-row tiles, cp.async
    ([40, 64, 0, 52], [64, 0, 60, 32], True),  # prefill sizes: the loads go by TMA
], ids=["decode", "tma"])
def test_gluon_in_a_cuda_graph(before: list[int], after: list[int], tma: bool) -> None:
    """Captured and replayed on new inputs and counts, the kernel gives what it gives eagerly (decode
    graphs); with TMA loads the descriptors are the ones built at capture."""
    device = _hopper()
    e, h, i = len(before), 1024, 512
    weights = _int4_weights(e, h, i, torch.bfloat16, device)
    counts = torch.tensor(before, device=device)
    x = torch.randn(int(counts.sum()), h, device=device, dtype=torch.bfloat16)
    if tma:
        assert iw.x_tma_ok(x, None, h, iw.default_tiles(int(counts.sum()) / e, True).block_t)
    out = torch.empty_like(x)
    fm.grouped_mlp(x, counts, weights, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fm.grouped_mlp(x, counts, weights, out=out)
    x.copy_(torch.randn_like(x))
    counts.copy_(torch.tensor(after, device=device))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fm.grouped_mlp(x, counts, weights))
