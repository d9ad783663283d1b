"""Sweep the MLA decode kernel's tiles on a GPU (DeepSeek-V3 / Kimi K2 latent cache: 512 + 64 bf16
values per token, pages of 64, shuffled block tables) and print ms, GB/s and share of the copy
bandwidth per configuration, best first; checks each against the default configuration's output.

    python scripts/tune_mla_decode.py [--heads 128] [--batch 64] [--context 4096] [--out mla-tiles.json]
    python scripts/tune_mla_decode.py --configs "128x32x16x1;128x16x16x2"   # BLOCK_H x BLOCK_N x warps x stages

The default candidates include BLOCK_H = 128 with 16 warps: all 128 heads of a sequence in one
program, so QK^T is split over four warpgroups instead of computed whole by both warpgroups of a
64-head program, with the (128, 512) fp32 accumulator at 128 registers a thread.
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from moecluster.cluster.bench.kernels import copy_bandwidth_gbs
from moecluster.kernels.mla_decode import mla_decode

CANDIDATES = [(64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 16, 1), (128, 16, 16, 2), (128, 32, 16, 2),
              (128, 16, 8, 2), (128, 64, 16, 1), (32, 64, 4, 2)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--configs", default="", help="BLOCK_H x BLOCK_N x warps x stages;... (default: CANDIDATES)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    configs = ([tuple(int(v) for v in c.split("x")) for c in args.configs.split(";") if c] if args.configs
               else CANDIDATES)
    rank, rope, block = 512, 64, 64
    dim = rank + rope
    g = torch.Generator(device="cuda").manual_seed(0)
    per_seq = args.context // block
    cache = torch.randn(args.batch * per_seq, block, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    tables = torch.randperm(args.batch * per_seq, device="cuda", generator=g).view(args.batch, per_seq).to(torch.int32)
    lens = torch.full((args.batch,), args.context, device="cuda", dtype=torch.int32)
    q = torch.randn(args.batch, args.heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    scale = dim**-0.5
    nbytes = (cache.numel() + q.numel() + args.batch * args.heads * rank) * 2
    bw = copy_bandwidth_gbs()
    want = mla_decode(q, cache, tables, lens, scale, rank)
    rows = []
    for bh, bn, warps, stages in [(None, None, None, None), *configs]:
        kw = dict(block_h=bh, block_n=bn, num_warps=warps, num_stages=stages)
        try:
            got = mla_decode(q, cache, tables, lens, scale, rank, **kw)
            ms = float(do_bench(lambda: mla_decode(q, cache, tables, lens, scale, rank, **kw), warmup=5, rep=40,
                                return_mode="median"))
        except Exception as e:  # noqa: BLE001 - a configuration that does not fit is reported and skipped
            print(f"skip {kw}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        err = float((got.float() - want.float()).abs().max())
        gbs = nbytes / (ms * 1e-3) / 1e9
        rows.append({**kw, "ms": ms, "gbs": gbs, "of_copy": gbs / bw, "max_abs_diff_vs_default": err})
        print(f"{'default' if bh is None else f'{bh}x{bn}x{warps}x{stages}':>14}  {ms:.3f} ms  {gbs:6.0f} GB/s  "
              f"{gbs / bw:4.0%} of copy  max |diff| {err:.4f}", flush=True)
    rows.sort(key=lambda r: r["ms"])
    print(f"copy {bw:.0f} GB/s; best: {rows[0] if rows else None}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"heads": args.heads, "batch": args.batch, "context": args.context, "copy_gbs": bw,
                       "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
