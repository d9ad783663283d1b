"""`moecluster bench kernels` (GPU): the Triton kernels against what bounds them, in one run.

1. Bounds measured in the same run: copy bandwidth (a 2 GiB device-to-device `copy_`, bytes read
   + written over the time) and dense bf16 matmul throughput (8192^3 `torch.matmul`).
2. MLA decode (`kernels/mla_decode.py`) at batch x context x heads, every sequence `context` long
   and again with lengths drawn from 1..context, latent cache bf16 in blocks of 64 tokens x 576
   values, block tables shuffled: time (20 calls replayed in a CUDA graph, as the engine runs a
   decode step's layers, sharing one work plan; beside it the same with a plan made by every call,
   and the eager time), bytes read (the tokens' cache rows + q + out) / time in
   GB/s, and that as a fraction of the copy bandwidth; where the Gluon seesaw kernel takes the
   call, the Triton kernel's time on the same inputs beside it; SGLang's Triton MLA decode kernel on the
   same shapes when `.peers/sglang_min` exists (`../shared/peers/sglang_mla.sh`; page size 1 over
   the same cache, the way its MLA backend calls it), and FlashMLA's dense decode kernel (the CUDA
   kernel SGLang and vLLM run on Hopper; `scripts/peers/flashmla.sh` puts vLLM's compiled copy in
   `.peers/flashmla`) over the same paged cache, timed the same way as ours.
3. Fused MoE (`kernels/fused_moe.py`) at DeepSeek-V3 shapes (hidden 7168, intermediate 2048, 32
   local experts) and m tokens per expert: our bf16 (the default path, torch's grouped GEMM at
   prefill sizes, and the Triton kernel beside it) and INT4 (group 32) grouped MLP against
   `torch._grouped_mm` in bf16 (gate_up, SiLU-and-mul, down) and against the roofline
   max(weight + activation bytes / copy bandwidth, flops / matmul throughput); FP8 (DeepSeek-V3's
   e4m3 experts with 128 x 128 block scales) in both modes, W8A16 and W8A8, the default marked.
4. FP8 linear (`fp8_linear`, DeepSeek-V3's dense MLP shape 7168 -> 18432) at rising rows, W8A16
   and W8A8 against bf16 `torch.matmul` on the dequantized weight; the e4m3 matmul throughput
   (`torch._scaled_mm`, 8192^3) measured beside the bf16 one is the W8A8 compute bound.

Times are medians of three `triton.testing.do_bench` medians (it clears the L2 between runs).
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch

PEERS = Path(".peers/sglang_min")
FLASHMLA = Path(".peers/flashmla")


@dataclass(frozen=True)
class KernelBenchConfig:
    mla_batches: tuple[int, ...] = (64, 128)
    mla_contexts: tuple[int, ...] = (4096, 32768)
    mla_heads: tuple[int, ...] = (128, 64)
    mla_mixed_lengths: bool = True  # also each shape with lengths drawn from 1..context
    moe_tokens_per_expert: tuple[int, ...] = (8, 64, 512, 4096)
    moe_experts: int = 32
    hidden: int = 7168
    intermediate: int = 2048
    linear_rows: tuple[int, ...] = (16, 64, 256, 1024, 4096, 16384)
    linear_out: int = 18432
    seed: int = 0
    only: tuple[str, ...] = ("mla", "moe", "linear")


ROUNDS = 3


def _time_ms(fn: Callable[[], Any]) -> float:
    """The median of ROUNDS `do_bench` medians: one round's median moved by up to 28% between two
    runs on the same lent H100 (INT4 at 64 tokens per expert, session 10), every kernel alike."""
    from triton.testing import do_bench

    return statistics.median(float(do_bench(fn, warmup=10, rep=50, return_mode="median")) for _ in range(ROUNDS))


def capture_graph(fn: Callable[[], Any], calls: int = 20) -> torch.cuda.CUDAGraph:
    """`calls` calls of fn captured in one CUDA graph (fn run once before, to compile and warm)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the inputs, made on the current stream, are ready
    with torch.cuda.stream(stream):
        fn()  # compile and warm outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(calls):
            fn()
    return graph


def graph_ms(fn: Callable[[], Any], calls: int = 20) -> float:
    """Per-call time of `calls` calls captured in one CUDA graph and replayed (`_time_ms` of the
    replay / calls): the GPU's time, as the engine runs decode steps, without the host's launch
    costs, which an eager loop of short kernels measures instead."""
    return _time_ms(capture_graph(fn, calls).replay) / calls


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _time_ms(lambda: a @ b)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def fp8_matmul_tflops() -> float | None:
    """e4m3 x e4m3 -> bf16 throughput of `torch._scaled_mm` at 8192^3 (None where it is missing)."""
    a = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn).T  # column-major, as _scaled_mm wants
    one = torch.ones((), device="cuda")
    try:
        ms = _time_ms(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16))
    except (RuntimeError, AttributeError, TypeError) as e:
        print(f"no e4m3 matmul bound: {e!r}", file=sys.stderr)
        return None
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


# ---- MLA decode ------------------------------------------------------------------------------------
def _sglang_mla() -> Callable[..., Any] | None:
    if not PEERS.is_dir():
        return None
    sys.path.insert(0, str(PEERS))
    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    except Exception as e:  # noqa: BLE001 - the peer is optional; say why it is missing
        print(f"SGLang's kernel could not be imported: {e!r}", file=sys.stderr)
        return None
    return decode_attention_fwd


@functools.cache
def _flashmla() -> Any | None:
    """FlashMLA's `flash_mla_with_kvcache` from `.peers/flashmla`, or None (and why) where it cannot
    load: the extension needs the torch it was built against and the CUDA 13 runtime library."""
    if not FLASHMLA.is_dir():
        return None
    import ctypes

    try:
        try:
            ctypes.CDLL("libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
        except OSError:  # this torch was built against another CUDA: load the copy beside the peer
            ctypes.CDLL(str(FLASHMLA / "lib" / "libcudart.so.13"), mode=ctypes.RTLD_GLOBAL)
        sys.path.append(str(FLASHMLA))  # last: an installed vLLM, if any, is the one imported
        from vllm.third_party.flashmla import flash_mla_interface as fm
    except Exception as e:  # noqa: BLE001 - the peer is optional; say why it is missing
        print(f"FlashMLA could not be loaded: {e!r}", file=sys.stderr)
        return None
    return fm


MLA_RANK, MLA_ROPE, MLA_PAGE = 512, 64, 64  # DeepSeek-V3 / Kimi K2 latent rows, pages of 64 tokens
MLA_SCALE = (MLA_RANK + MLA_ROPE) ** -0.5  # the softmax scale the MLA benchmarks use
MLA_SCALE_LOG2 = MLA_SCALE * math.log2(math.e)  # the same in log2 units, as stage 1 takes it


def mla_inputs(batch: int, context: int, heads: int, gen: torch.Generator, mixed: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 MLA decode inputs on the GPU: q (batch, heads, 576), a cache of `context` tokens a
    sequence in pages of 64 (blocks, 64, 576), shuffled block tables (batch, context / 64) int32 and
    the lengths (batch,) int32: all `context`, or with `mixed` drawn uniformly from 1..context."""
    dim = MLA_RANK + MLA_ROPE
    blocks_per_seq = context // MLA_PAGE
    num_blocks = batch * blocks_per_seq
    cache = torch.randn(num_blocks, MLA_PAGE, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    tables = torch.randperm(num_blocks, device="cuda", generator=gen).view(batch, blocks_per_seq).to(torch.int32)
    if mixed:
        lens = torch.randint(1, context + 1, (batch,), device="cuda", dtype=torch.int32, generator=gen)
    else:
        lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, cache, tables, lens


def bench_mla(batch: int, context: int, heads: int, copy_gbs: float, gen: torch.Generator,
              mixed: bool = False) -> dict[str, Any]:
    """One MLA decode shape. `mixed`: sequence lengths drawn uniformly from 1..context (the block
    tables still hold `context` tokens, as the engine sizes them for the longest sequence), so
    the work plan meets unequal sequences; bytes count the tokens actually read."""
    from moecluster.kernels import mla_seesaw
    from moecluster.kernels.mla_decode import mla_decode

    rank, block, scale = MLA_RANK, MLA_PAGE, MLA_SCALE
    dim = MLA_RANK + MLA_ROPE
    q, cache, tables, lens = mla_inputs(batch, context, heads, gen, mixed)
    tokens_read = int(lens.sum())
    nbytes = (tokens_read * dim + q.numel() + batch * heads * rank) * 2

    def call() -> None:  # plans its work itself
        mla_decode(q, cache, tables, lens, scale, rank)

    def step() -> Callable[[], None]:
        """A call as a model layer makes it: the graph's calls share one work plan, as a decode
        step's layers do (`plans`, one dict a step and a capture), so the plan kernel runs once a
        replay, not once a call."""
        plans: dict[tuple, tuple] = {}
        return lambda: mla_decode(q, cache, tables, lens, scale, rank, plans=plans)

    ms = graph_ms(step())
    row: dict[str, Any] = {"batch": batch, "context": context, "heads": heads,
                           "lengths": "mixed" if mixed else "equal", "tokens_read": tokens_read, "ours_ms": ms,
                           "ours_gbs": nbytes / (ms * 1e-3) / 1e9, "ours_plan_each_call_ms": graph_ms(call),
                           "ours_eager_ms": _time_ms(call),
                           "kernel": "seesaw" if mla_seesaw.supported(q, cache, rank) else "triton"}
    row["ours_of_copy"] = row["ours_gbs"] / copy_gbs
    if row["kernel"] == "seesaw":  # the Triton kernel beside it, same inputs
        with mock.patch.dict(os.environ, {"MOECLUSTER_MLA_SEESAW": "0"}):
            row["triton_ms"] = graph_ms(step())
        row["triton_of_copy"] = nbytes / (row["triton_ms"] * 1e-3) / 1e9 / copy_gbs
    peer = _sglang_mla()
    if peer is not None and batch * context * dim >= 2**31:
        # its kernel indexes the token buffer in int32 (token index x 576): past 2**31 elements the
        # address overflows (an illegal memory access), so it is not run there
        row["sglang_skipped"] = "int32 token indexing overflows at this size"
    elif peer is not None:
        splits = 8
        k_buf = cache.view(-1, 1, dim)
        v_buf = k_buf[..., :rank]
        tokens = (tables.long()[:, :, None] * block + torch.arange(block, device="cuda")).reshape(batch, -1)
        keep = torch.arange(context, device="cuda")[None, :] < lens[:, None]
        indices = tokens[keep].to(torch.int32)  # each sequence's first lens[b] token slots, in order
        indptr = torch.zeros(batch + 1, device="cuda", dtype=torch.int32)
        indptr[1:] = lens.cumsum(0)
        o = torch.empty(batch, heads, rank, device="cuda", dtype=torch.bfloat16)
        logits = torch.empty(batch, heads, splits, rank, device="cuda", dtype=torch.float32)
        lse = torch.empty(batch, heads, splits, device="cuda", dtype=torch.float32)
        nsplits = torch.full((batch,), splits, device="cuda", dtype=torch.int32)

        def run_peer() -> None:
            peer(q, k_buf, v_buf, o, indptr, indices, logits, lse, nsplits, splits, scale, 1.0, 1.0)

        run_peer()
        ours = mla_decode(q, cache, tables, lens, scale, rank)
        row["max_abs_diff_vs_sglang"] = float((ours.float() - o.float()).abs().max())
        pms = _time_ms(run_peer)
        row["sglang_ms"], row["sglang_gbs"] = pms, nbytes / (pms * 1e-3) / 1e9
        row["sglang_of_copy"] = row["sglang_gbs"] / copy_gbs
    fm = _flashmla()
    if fm is not None:
        meta, _ = fm.get_mla_metadata()
        q4, k4 = q.unsqueeze(1), cache.unsqueeze(2)  # (batch, 1, heads, 576), (blocks, 64, 1, 576)

        def run_flashmla() -> torch.Tensor:
            return fm.flash_mla_with_kvcache(q4, k4, tables, lens, rank, meta, softmax_scale=scale)[0]

        # its first call also makes its split schedule, which later calls reuse: made once, outside the
        # timed calls (ours is made once a replay of 20 calls, as a step's layers share it)
        theirs = run_flashmla()
        ours = mla_decode(q, cache, tables, lens, scale, rank)
        row["max_abs_diff_vs_flashmla"] = float((ours.float() - theirs[:, 0].float()).abs().max())
        fms = graph_ms(run_flashmla)
        row["flashmla_ms"], row["flashmla_gbs"] = fms, nbytes / (fms * 1e-3) / 1e9
        row["flashmla_of_copy"] = row["flashmla_gbs"] / copy_gbs
    return row


# ---- fused MoE -------------------------------------------------------------------------------------
def grouped_mm_baseline(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The bf16 baseline: `torch._grouped_mm` for gate_up (w13 (E, 2I, H)), torch's SiLU and mul,
    `torch._grouped_mm` for down (w2 (E, H, I)); rows grouped by expert, offs (E,) int32 end rows."""
    i = w2.shape[2]
    gu = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)  # (rows, 2I)
    h = torch.nn.functional.silu(gu[:, :i]) * gu[:, i:]
    return torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)  # (rows, H)


def bench_moe(per_expert: int, cfg: KernelBenchConfig, copy_gbs: float, tflops: float, gen: torch.Generator) -> dict[str, Any]:
    from moecluster.kernels import fused_moe as fm
    from moecluster.kernels import grouped_mm_mlp

    E, H, I = cfg.moe_experts, cfg.hidden, cfg.intermediate  # noqa: N806
    rows = E * per_expert
    x = torch.randn(rows, H, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.1
    counts = torch.full((E,), per_expert, device="cuda", dtype=torch.int32)
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
    flops = 2 * rows * H * 2 * I + 2 * rows * I * H
    act_bytes = (rows * H * 2) * 2 + rows * I * 2 * 2  # x in, out, intermediate written + read
    row: dict[str, Any] = {"tokens_per_expert": per_expert, "rows": rows}

    offs = torch.cumsum(counts, 0).to(torch.int32)

    def grouped_mm() -> torch.Tensor:
        return grouped_mm_baseline(x, w13, w2, offs)

    try:
        row["grouped_mm_ms"] = _time_ms(grouped_mm)
    except (RuntimeError, AttributeError) as e:
        row["grouped_mm_error"] = repr(e)

    bf16 = fm.DenseExperts(w13[:, :I], w13[:, I:], w2)
    ref = grouped_mm() if "grouped_mm_ms" in row else None
    out = fm.grouped_mlp(x, counts, bf16)
    if ref is not None:
        row["bf16_rel_err_vs_grouped_mm"] = float((out.float() - ref.float()).norm() / ref.float().norm())
    row["bf16_ms"] = _time_ms(lambda: fm.grouped_mlp(x, counts, bf16))  # torch's grouped GEMM at prefill sizes
    bf16_tiles = dict(zip(("gate_up_tiles", "down_tiles"), fm.default_tiles(rows, bf16, x.dtype)))
    row["bf16_triton_ms"] = _time_ms(lambda: fm.grouped_mlp(x, counts, bf16, **bf16_tiles))  # explicit tiles: Triton
    row["bf16_path"] = "grouped_mm" if grouped_mm_mlp.supported(x, bf16, rows) else "triton"
    w_bytes = (w13.numel() + w2.numel()) * 2
    row["bf16_roofline_ms"] = max((w_bytes + act_bytes) / (copy_gbs * 1e9), flops / (tflops * 1e12)) * 1e3
    del bf16, w13, w2, ref, out

    int4_w = fm.Int4Experts.from_compressed_tensors(*(random_int4(E, o, i, gen) for o, i in ((I, H), (I, H), (H, I))), H, I)
    row["int4_ms"] = _time_ms(lambda: fm.grouped_mlp(x, counts, int4_w))  # Gluon on Hopper, else Triton
    gu, dn = fm.default_tiles(rows, int4_w, x.dtype)
    # explicit tiles keep the Triton kernel: beside the default (Gluon on Hopper), and bit-equal to it
    triton_tiles = dict(gate_up_tiles=gu, down_tiles=dn)
    row["int4_triton_ms"] = _time_ms(lambda: fm.grouped_mlp(x, counts, int4_w, **triton_tiles))
    out_default = fm.grouped_mlp(x, counts, int4_w)
    row["int4_triton_equal"] = bool(torch.equal(fm.grouped_mlp(x, counts, int4_w, **triton_tiles), out_default))

    w4_bytes = sum(w.packed.numel() * 4 + w.scale.numel() * 2 for w in (int4_w.gate, int4_w.up, int4_w.down))
    row["int4_roofline_ms"] = max((w4_bytes + act_bytes) / (copy_gbs * 1e9), flops / (tflops * 1e12)) * 1e3
    del int4_w

    (g8, gs8), (u8, us8), (d8, ds8) = (random_fp8(E, o, i, gen) for o, i in ((I, H), (I, H), (H, I)))
    fp8_w = fm.Fp8Experts(g8, gs8, u8, us8, d8, ds8)
    row["fp8_default"] = "W8A8" if fm.w8a8_default(per_expert, x) else "W8A16"  # what grouped_mlp picks
    row["fp8_w8a16_ms"] = _time_ms(lambda: fm.grouped_mlp(x, counts, fp8_w, fp8_activations=False))
    row["fp8_w8a8_ms"] = _time_ms(lambda: fm.grouped_mlp(x, counts, fp8_w, fp8_activations=True))
    row["fp8_ms"] = row["fp8_w8a8_ms" if row["fp8_default"] == "W8A8" else "fp8_w8a16_ms"]
    a16 = fm.grouped_mlp(x, counts, fp8_w, fp8_activations=False).float()
    a8 = fm.grouped_mlp(x, counts, fp8_w, fp8_activations=True).float()
    row["fp8_w8a8_rel_err_vs_w8a16"] = float((a8 - a16).norm() / a16.norm())
    w8_bytes = (g8.numel() * 3) + (gs8.numel() * 3) * 4
    row["fp8_roofline_ms"] = max((w8_bytes + act_bytes) / (copy_gbs * 1e9), flops / (tflops * 1e12)) * 1e3
    if "grouped_mm_ms" in row:
        row["bf16_speedup_vs_grouped_mm"] = row["grouped_mm_ms"] / row["bf16_ms"]
        row["int4_speedup_vs_grouped_mm"] = row["grouped_mm_ms"] / row["int4_ms"]
        row["fp8_speedup_vs_grouped_mm"] = row["grouped_mm_ms"] / row["fp8_ms"]
    return row


def random_int4(experts: int, out_f: int, in_f: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random INT4 expert weights in the compressed-tensors layout (packed int32 (E, out, in/8),
    bf16 scales (E, out, in/32)), on the GPU (also the tile sweeps' weights)."""
    from moecluster.workers.quant.int4 import pack_int4

    q = torch.randint(-8, 8, (experts, out_f, in_f), device="cuda", dtype=torch.int8, generator=gen)
    scale = torch.rand(experts, out_f, in_f // 32, device="cuda", generator=gen).to(torch.bfloat16) * 0.01
    return pack_int4(q), scale


def random_fp8(experts: int, out_f: int, in_f: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random DeepSeek-V3-layout FP8 expert weights: e4m3 (E, out, in) and float32 128 x 128 block scales."""
    w = (torch.randn(experts, out_f, in_f, device="cuda", generator=gen) * 2).to(torch.float8_e4m3fn)
    return w, torch.rand(experts, out_f // 128, in_f // 128, device="cuda", generator=gen) * 0.01


# ---- FP8 linear ------------------------------------------------------------------------------------
def bench_linear(rows: int, cfg: KernelBenchConfig, copy_gbs: float, tflops: float, fp8_tflops: float | None,
                 gen: torch.Generator) -> dict[str, Any]:
    from moecluster.kernels import fused_moe as fm

    n, k = cfg.linear_out, cfg.hidden
    w = (torch.randn(n, k, device="cuda", generator=gen) * 2).to(torch.float8_e4m3fn)
    scale = torch.rand(n // 128, k // 128, device="cuda", generator=gen) * 0.01
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    dense = fm.dequantize_fp8(w, scale, (128, 128), torch.bfloat16)
    flops = 2 * rows * n * k
    row: dict[str, Any] = {"rows": rows, "n": n, "k": k,
                           "default": "W8A8" if fm.w8a8_default(rows, x, fm.W8A8_LINEAR_MIN_ROWS) else "W8A16",
                           "bf16_matmul_ms": _time_ms(lambda: x @ dense.T),
                           "w8a16_ms": _time_ms(lambda: fm.fp8_linear(x, w, scale, fp8_activations=False)),
                           "w8a8_ms": _time_ms(lambda: fm.fp8_linear(x, w, scale, fp8_activations=True))}
    ref = (x @ dense.T).float()
    got = fm.fp8_linear(x, w, scale, fp8_activations=True).float()
    row["w8a8_rel_err_vs_bf16"] = float((got - ref).norm() / ref.norm())
    w_bytes, act_bytes = n * k + scale.numel() * 4, rows * (k + n) * 2
    row["w8a16_roofline_ms"] = max((w_bytes + act_bytes) / (copy_gbs * 1e9), flops / (tflops * 1e12)) * 1e3
    if fp8_tflops:
        row["w8a8_roofline_ms"] = max((w_bytes + act_bytes) / (copy_gbs * 1e9), flops / (fp8_tflops * 1e12)) * 1e3
    return row


@dataclass
class KernelBenchResult:
    device: str
    copy_gbs: float
    matmul_tflops: float
    fp8_matmul_tflops: float | None = None
    mla: list[dict[str, Any]] = field(default_factory=list)
    moe: list[dict[str, Any]] = field(default_factory=list)
    linear: list[dict[str, Any]] = field(default_factory=list)


def run(cfg: KernelBenchConfig, checkpoint: Callable[[KernelBenchResult], None] | None = None) -> KernelBenchResult:
    if not torch.cuda.is_available():
        raise RuntimeError("bench kernels needs a CUDA GPU (the Triton kernels' CPU path is the torch reference)")
    gen = torch.Generator(device="cuda").manual_seed(cfg.seed)
    fp8 = fp8_matmul_tflops() if {"moe", "linear"} & set(cfg.only) else None
    result = KernelBenchResult(torch.cuda.get_device_name(), copy_bandwidth_gbs(), matmul_tflops(), fp8)
    if "mla" in cfg.only:
        for heads in cfg.mla_heads:
            for batch in cfg.mla_batches:
                for context in cfg.mla_contexts:
                    for mixed in (False, True) if cfg.mla_mixed_lengths else (False,):
                        print(f"MLA decode: heads {heads}, batch {batch}, context {context}"
                              f"{', mixed lengths' if mixed else ''}", file=sys.stderr, flush=True)
                        result.mla.append(bench_mla(batch, context, heads, result.copy_gbs, gen, mixed))
                        torch.cuda.empty_cache()
                        if checkpoint is not None:
                            checkpoint(result)
    if "moe" in cfg.only:
        for m in cfg.moe_tokens_per_expert:
            print(f"fused MoE: {m} tokens per expert", file=sys.stderr, flush=True)
            result.moe.append(bench_moe(m, cfg, result.copy_gbs, result.matmul_tflops, gen))
            torch.cuda.empty_cache()
            if checkpoint is not None:
                checkpoint(result)
    if "linear" in cfg.only:
        for rows in cfg.linear_rows:
            print(f"FP8 linear: {rows} rows", file=sys.stderr, flush=True)
            result.linear.append(bench_linear(rows, cfg, result.copy_gbs, result.matmul_tflops,
                                              result.fp8_matmul_tflops, gen))
            torch.cuda.empty_cache()
            if checkpoint is not None:
                checkpoint(result)
    return result


def print_tables(result: KernelBenchResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 200))
    console.print(f"{result.device}: copy {result.copy_gbs:.0f} GB/s, bf16 matmul {result.matmul_tflops:.0f} TFLOP/s, "
                  f"e4m3 matmul {_f(result.fp8_matmul_tflops, '.0f')} TFLOP/s")
    if result.mla:
        t = Table(title="MLA decode (bf16 latent cache, 576 values per token)")
        for col in ("heads", "batch", "context", "lengths", "kernel", "ours ms", "ours GB/s", "of copy", "plan each call ms",
                    "eager ms", "Triton ms",
                    "Triton of copy", "SGLang ms", "SGLang GB/s", "SGLang of copy", "FlashMLA ms", "FlashMLA of copy"):
            t.add_column(col, justify="right")
        for r in result.mla:
            t.add_row(str(r["heads"]), str(r["batch"]), str(r["context"]), r.get("lengths", "equal"), r["kernel"], f"{r['ours_ms']:.3f}",
                      f"{r['ours_gbs']:.0f}", f"{r['ours_of_copy']:.0%}", _f(r.get("ours_plan_each_call_ms"), ".3f"),
                      f"{r['ours_eager_ms']:.3f}",
                      _f(r.get("triton_ms"), ".3f"), _f(r.get("triton_of_copy"), ".0%"),
                      _f(r.get("sglang_ms"), ".3f"), _f(r.get("sglang_gbs"), ".0f"), _f(r.get("sglang_of_copy"), ".0%"),
                      _f(r.get("flashmla_ms"), ".3f"), _f(r.get("flashmla_of_copy"), ".0%"))
        console.print(t)
    if result.moe:
        t = Table(title="fused MoE, hidden 7168, intermediate 2048, 32 local experts")
        for col in ("tokens/expert", "_grouped_mm bf16 ms", "ours bf16 ms", "bf16 path", "bf16 Triton ms", "bf16 roofline ms", "bf16 speedup",
                    "ours INT4 ms", "INT4 Triton ms", "INT4 roofline ms", "INT4 speedup", "FP8 W8A16 ms", "FP8 W8A8 ms",
                    "FP8 default",
                    "FP8 speedup"):
            t.add_column(col, justify="right")
        for r in result.moe:
            t.add_row(str(r["tokens_per_expert"]), _f(r.get("grouped_mm_ms"), ".3f"), f"{r['bf16_ms']:.3f}",
                      r["bf16_path"], f"{r['bf16_triton_ms']:.3f}",
                      f"{r['bf16_roofline_ms']:.3f}", _f(r.get("bf16_speedup_vs_grouped_mm"), ".2f"),
                      f"{r['int4_ms']:.3f}", _f(r.get("int4_triton_ms"), ".3f"), f"{r['int4_roofline_ms']:.3f}", _f(r.get("int4_speedup_vs_grouped_mm"), ".2f"),
                      f"{r['fp8_w8a16_ms']:.3f}", f"{r['fp8_w8a8_ms']:.3f}", r["fp8_default"],
                      _f(r.get("fp8_speedup_vs_grouped_mm"), ".2f"))
        console.print(t)
    if result.linear:
        t = Table(title="FP8 linear (e4m3, 128 x 128 block scales) against bf16 matmul")
        for col in ("rows", "N x K", "bf16 matmul ms", "W8A16 ms", "W8A8 ms", "default", "W8A8 roofline ms",
                    "W8A8 rel err"):
            t.add_column(col, justify="right")
        for r in result.linear:
            t.add_row(str(r["rows"]), f"{r['n']} x {r['k']}", f"{r['bf16_matmul_ms']:.3f}", f"{r['w8a16_ms']:.3f}",
                      f"{r['w8a8_ms']:.3f}", r["default"], _f(r.get("w8a8_roofline_ms"), ".3f"),
                      f"{r['w8a8_rel_err_vs_bf16']:.4f}")
        console.print(t)


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def main(cfg: KernelBenchConfig, out: Path | None) -> KernelBenchResult:
    def save(result: KernelBenchResult) -> None:  # after every case, so a crash keeps what was measured
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"config": asdict(cfg), **asdict(result)}, indent=2))

    result = run(cfg, save)
    save(result)
    print_tables(result)
    return result
