"""Sweep the fused MoE kernels' tiles on a GPU (DeepSeek-V3 shapes, 32 local experts) and print
the best per size and format: the source of `kernels/fused_moe.py::default_tiles`.

    python scripts/tune_fused_moe.py [--sizes 8,64,512,4096] [--out tiles.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from moecluster.kernels import fused_moe as fm
from moecluster.workers.quant.int4 import pack_int4

DENSE = [(64, 128, 64, 4, 4), (64, 128, 64, 8, 4), (64, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
         (128, 64, 64, 4, 4), (128, 256, 64, 8, 3), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4), (32, 128, 64, 4, 4)]
INT4 = [(16, 64, 256, 4, 2), (16, 128, 256, 4, 3), (32, 64, 128, 4, 2), (32, 128, 128, 4, 3), (64, 64, 128, 4, 2),
        (64, 128, 128, 8, 3), (64, 64, 256, 4, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 3), (128, 64, 128, 4, 3)]


def ms(fn) -> float:  # noqa: ANN001
    return float(do_bench(fn, warmup=5, rep=30, return_mode="median"))


def sweep(x, counts, weights, candidates) -> dict:  # noqa: ANN001
    def run(gu, dn):  # noqa: ANN001, ANN202
        try:
            return ms(lambda: fm.grouped_mlp(x, counts, weights, gate_up_tiles=fm.TileConfig(*gu),
                                             down_tiles=fm.TileConfig(*dn)))
        except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
            print(f"  skip {gu} / {dn}: {type(e).__name__}: {str(e)[:80]}", flush=True)
            return float("inf")

    d_gu, d_dn = fm.default_tiles(x.shape[0], weights, x.dtype)
    base = ms(lambda: fm.grouped_mlp(x, counts, weights))
    best_gu = min(candidates, key=lambda c: run(c, (d_dn.block_m, d_dn.block_n, d_dn.block_k, d_dn.num_warps, d_dn.num_stages)))
    best_dn = min(candidates, key=lambda c: run(best_gu, c))
    return {"default_ms": base, "best_gate_up": best_gu, "best_down": best_dn, "best_ms": run(best_gu, best_dn)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8,64,512,4096")
    p.add_argument("--out", default=None)
    p.add_argument("--formats", default="bf16,int4", help="which weight formats to sweep")
    p.add_argument("--int4-extra", default="", help="more INT4 candidates, e.g. 16x32x256x4x3;16x64x512x4x2")
    args = p.parse_args()
    extra = [tuple(int(v) for v in c.split("x")) for c in args.int4_extra.split(";") if c]
    E, H, I = 32, 7168, 2048  # noqa: N806
    g = torch.Generator(device="cuda").manual_seed(0)
    dense = fm.DenseExperts(*(torch.randn(E, a, b, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
                              for a, b in ((I, H), (I, H), (H, I))))

    def int4(o: int, i: int):  # noqa: ANN202
        q = torch.randint(-8, 8, (E, o, i), device="cuda", dtype=torch.int8, generator=g)
        return pack_int4(q), torch.rand(E, o, i // 32, device="cuda", generator=g).to(torch.bfloat16) * 0.01

    quant = fm.Int4Experts.from_compressed_tensors(int4(I, H), int4(I, H), int4(H, I), H, I)
    results = {}
    for m in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(E * m, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
        counts = torch.full((E,), m, device="cuda", dtype=torch.int32)
        for name, w, cands in (("bf16", dense, DENSE), ("int4", quant, INT4 + extra)):
            if name not in args.formats.split(","):
                continue
            r = sweep(x, counts, w, cands)
            results[f"{name}-{m}"] = r
            print(name, m, json.dumps(r), flush=True)
        del x
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
