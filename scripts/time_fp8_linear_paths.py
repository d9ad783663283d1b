"""Time DeepSeek-V3's dense FP8 linears at decode rows (GPU) by several paths, each replayed from a
CUDA graph and set against its bytes over the copy bandwidth: the engine's `fp8_linear` W8A16
(the decode default) and W8A8 with split K, torch's block-scaled `_scaled_mm` (if this torch and
GPU take 1 x 128 / 128 x 128 scales), cuBLAS bf16 on a dequantized copy (twice the bytes), and an
experimental swap-AB W8A16 Triton kernel (the weight tile as the dot's first operand). Prints a
table and writes JSON.

    python scripts/time_fp8_linear_paths.py [--rows 16,32,64] [--out paths.json]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from moecluster.cluster.bench.kernels import copy_bandwidth_gbs
from moecluster.cluster.plan.presets import PRESETS
from moecluster.kernels import fused_moe as fm
from moecluster.kernels.fp8_quant import quantize_fp8_groups
from moecluster.kernels.moe_weights import dequantize_fp8
from moecluster.kernels.moe_tiles import TileConfig


@triton.jit
def _swap_kernel(x_ptr, w_ptr, s_ptr, out_ptr, M, N, K, k_split, stride_xm, stride_wn, stride_sn, stride_os, stride_om,
                 BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, m, n] = sum over this split's K of x[m, k] * w[n, k] * s[n // 128, k // 128]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=offs_n[:, None] < N, other=0.0)
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=offs_m[None, :] < M, other=0.0)
        s = tl.load(s_ptr + (offs_n // 128) * stride_sn + k0 // 128, mask=offs_n < N, other=0.0)
        part = tl.dot(w.to(xt.dtype), xt)  # (BLOCK_N, BLOCK_M)
        acc += part * s[:, None]
    ptrs = out_ptr + pid_k * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(ptrs, acc, mask=(offs_m[None, :] < M) & (offs_n[:, None] < N))


def swap_linear(x, w, s, block_n: int, split: int, warps: int, stages: int) -> torch.Tensor:  # noqa: ANN001
    rows, k = x.shape
    n = w.shape[0]
    bm = max(16, triton.next_power_of_2(rows))
    bk = 128
    steps = triton.cdiv(k, bk)
    k_split = triton.cdiv(steps, split) * bk
    split = triton.cdiv(k, k_split)
    out = torch.empty((split, rows, n), dtype=torch.float32, device=x.device)
    _swap_kernel[(triton.cdiv(n, block_n), split)](x, w, s, out, rows, n, k, k_split, x.stride(0), w.stride(0), s.stride(0),
                                                   out.stride(0), out.stride(1), BLOCK_N=block_n, BLOCK_M=bm, BLOCK_K=bk,
                                                   num_warps=warps, num_stages=stages)
    return out.sum(0).to(x.dtype) if split > 1 else out[0].to(x.dtype)


def ms(fn) -> float:  # noqa: ANN001
    try:
        return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))
    except Exception as e:  # noqa: BLE001 - a path this torch / GPU lacks is reported and skipped
        print(f"  skip: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return float("inf")


def scaled_mm(x, w, s):  # noqa: ANN001
    """torch's block-scaled FP8 GEMM (cuBLAS): activations quantized per (row, 128), weight scales
    per 128 x 128; torch 2.11 takes the activation scales outer-dim-major and the weight's transposed."""
    q, qs = quantize_fp8_groups(x, 128)  # (rows, K) e4m3, (rows, K / 128)
    return torch._scaled_mm(q, w.t(), scale_a=qs.t().contiguous().t(), scale_b=s.t(), out_dtype=torch.bfloat16)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default="16,32,64")
    p.add_argument("--skip", default="", help="families not to time: swap, scaledmm, bf16")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    cfg = PRESETS["deepseek-v3"]
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    shapes = [("q_a", cfg["q_lora_rank"], h), ("kv_a", cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], h),
              ("q_b", heads * (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]), cfg["q_lora_rank"]),
              ("o", h, heads * cfg["v_head_dim"]), ("dense_gate_up", 2 * cfg["intermediate_size"], h),
              ("dense_down", h, cfg["intermediate_size"]), ("shared_gate_up", 2 * cfg["moe_intermediate_size"], h),
              ("shared_down", h, cfg["moe_intermediate_size"])]
    bw = copy_bandwidth_gbs()
    print(f"copy {bw:.0f} GB/s, {torch.cuda.get_device_name()}")
    g = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for name, n, k in shapes:
        w = (torch.randn(n, k, device="cuda", generator=g) * 2).to(torch.float8_e4m3fn)
        s = torch.rand(-(-n // 128), -(-k // 128), device="cuda", generator=g) * 0.01 + 0.001
        wd = dequantize_fp8(w, s, (128, 128), torch.bfloat16)
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g)
            ref = (x.float() @ wd.float().T)
            roof = (n * k + s.numel() * 4 + rows * (k + n) * 2) / bw / 1e6
            r = {"name": name, "n": n, "k": k, "rows": rows, "roofline_ms": roof, "ms": {}, "max_rel_err": {}}

            def add(label, fn):  # noqa: ANN001, ANN202
                if label.split("_")[0] in skip:
                    return
                try:
                    y = fn().float()
                    r["max_rel_err"][label] = float((y - ref).abs().max() / ref.abs().max())
                except Exception as e:  # noqa: BLE001
                    print(f"  {label}: {type(e).__name__}: {str(e)[:160]}", flush=True)
                    return
                r["ms"][label] = ms(fn)

            add("w8a16_default", lambda: fm.fp8_linear(x, w, s, fp8_activations=False))
            add("w8a8_default", lambda: fm.fp8_linear(x, w, s, fp8_activations=True))
            for sp in (1, 2, 4, 8):
                t = TileConfig(64, 128, 128, 8, 3, split_k=sp)
                add(f"w8a8_64x128x128x8x3/s{sp}", lambda t=t: fm.fp8_linear(x, w, s, fp8_activations=True, tiles=t))
                t = TileConfig(max(16, rows), 64, 128, 4, 4, split_k=sp)
                add(f"w8a8_{t.block_m}x64x128x4x4/s{sp}", lambda t=t: fm.fp8_linear(x, w, s, fp8_activations=True, tiles=t))
            add("scaledmm_blockwise", lambda: scaled_mm(x, w, s))
            add("bf16_cublas_dequantized", lambda: x @ wd.T)
            for bn in (64, 128):
                for sp in (1, 2, 4, 8, 16):
                    for warps, stages in ((4, 3), (4, 5), (8, 4)):
                        add(f"swap_{bn}/s{sp}/w{warps}x{stages}",
                            lambda bn=bn, sp=sp, warps=warps, stages=stages: swap_linear(x, w, s, bn, sp, warps, stages))
            best = sorted(r["ms"].items(), key=lambda kv: kv[1])
            fam = {}
            for label, v in best:
                fam.setdefault(label.split("/")[0].split("_")[0], (label, v))
            print(f"{name:>15} rows {rows:3d} roof {roof * 1e3:7.1f} us | "
                  + " | ".join(f"{lab} {v * 1e3:.1f} ({v / roof:.1f}x)" for lab, v in fam.values()), flush=True)
            results.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"copy_gbs": bw, "gpu": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
