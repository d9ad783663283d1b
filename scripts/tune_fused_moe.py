"""Sweep the fused MoE kernels' tiles on a GPU (DeepSeek-V3 shapes, 32 local experts) and print
the best per size and format: the source of `kernels/fused_moe.py::default_tiles`.

    python scripts/tune_fused_moe.py [--sizes 8,64,512,4096] [--formats bf16,int4,fp8,fp8a8] [--out tiles.json]

fp8 is DeepSeek-V3's e4m3 experts in W8A16 mode, fp8a8 the same in W8A8. After the best tiles of
each kernel, the launch order (TileConfig.group_m) is swept for that pair.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch
from triton.testing import do_bench

from moecluster.cluster.bench.kernels import random_fp8, random_int4
from moecluster.kernels import fused_moe as fm

DENSE = [(64, 128, 64, 4, 4), (64, 128, 64, 8, 4), (64, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
         (128, 64, 64, 4, 4), (128, 256, 64, 8, 3), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4), (32, 128, 64, 4, 4)]
W8A8 = [(64, 128, 128, 8, 3), (128, 128, 128, 8, 3), (64, 256, 128, 8, 3), (128, 256, 128, 8, 3),
        (128, 64, 128, 4, 3), (64, 128, 128, 4, 4), (128, 128, 128, 8, 4), (32, 128, 128, 4, 4)]
GROUP_M = (0, 4, 8, 16, 32)
INT4 = [(16, 64, 256, 4, 2), (16, 128, 256, 4, 3), (32, 64, 128, 4, 2), (32, 128, 128, 4, 3), (64, 64, 128, 4, 2),
        (64, 128, 128, 8, 3), (64, 64, 256, 4, 3), (128, 128, 128, 8, 3), (64, 128, 128, 4, 3), (128, 64, 128, 4, 3),
        (32, 64, 256, 4, 2), (64, 64, 256, 4, 2), (128, 128, 256, 8, 2), (128, 64, 256, 4, 2)]  # block_k 128: k_block 128 only


def ms(fn) -> float:  # noqa: ANN001
    return float(do_bench(fn, warmup=5, rep=30, return_mode="median"))


def sweep(x, counts, weights, candidates, group_only: bool = False, **kw) -> dict:  # noqa: ANN001, ANN003
    def run(gu, dn):  # noqa: ANN001, ANN202
        try:
            return ms(lambda: fm.grouped_mlp(x, counts, weights, gate_up_tiles=fm.TileConfig(*gu),
                                             down_tiles=fm.TileConfig(*dn), **kw))
        except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
            print(f"  skip {gu} / {dn}: {type(e).__name__}: {str(e)[:80]}", flush=True)
            return float("inf")

    d_gu, d_dn = fm.default_tiles(x.shape[0], weights, x.dtype, fp8_activations=kw.get("fp8_activations", False))
    base = ms(lambda: fm.grouped_mlp(x, counts, weights, **kw))
    if group_only:  # the default tiles, only the launch order swept
        best_gu, best_dn = (dataclasses.astuple(t) for t in (d_gu, d_dn))
    else:
        best_gu = min(candidates, key=lambda c: run(c, dataclasses.astuple(d_dn)))
        best_dn = min(candidates, key=lambda c: run(best_gu, c))
    by_group = {g: run((*best_gu[:5], g, *best_gu[6:]), (*best_dn[:5], g, *best_dn[6:])) for g in GROUP_M}
    best_g = min(by_group, key=by_group.get)
    return {"default_gate_up": list(dataclasses.astuple(d_gu)), "default_down": list(dataclasses.astuple(d_dn)),
            "default_ms": base, "best_gate_up": (*best_gu[:5], best_g, *best_gu[6:]),
            "best_down": (*best_dn[:5], best_g, *best_dn[6:]),
            "best_ms": by_group[best_g], "ms_by_group_m": by_group}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8,64,512,4096")
    p.add_argument("--out", default=None)
    p.add_argument("--formats", default="bf16,int4", help="which weight formats to sweep: bf16,int4,int4x2,int4x4,int4x8 (sub-tiles per dot),int4s (scalar dequantization),fp8,fp8a8")
    p.add_argument("--int4-extra", default="", help="more INT4 candidates, e.g. 16x32x256x4x3;16x64x512x4x2")
    p.add_argument("--k-block", type=int, default=None, help="the INT4 repack's k_block (default: the library's)")
    p.add_argument("--group-only", default="", help="formats whose default tiles are kept: sweep only group_m")
    args = p.parse_args()
    extra = [tuple(int(v) for v in c.split("x")) for c in args.int4_extra.split(";") if c]
    E, H, I = 32, 7168, 2048  # noqa: N806
    g = torch.Generator(device="cuda").manual_seed(0)
    dense = fm.DenseExperts(*(torch.randn(E, a, b, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
                              for a, b in ((I, H), (I, H), (H, I))))

    shapes = ((I, H), (I, H), (H, I))  # gate, up, down
    quant = fm.Int4Experts.from_compressed_tensors(*(random_int4(E, o, i, g) for o, i in shapes), H, I, k_block=args.k_block)
    fp8_w = fm.Fp8Experts(*(t for o, i in shapes for t in random_fp8(E, o, i, g)))
    # int4xS: S sub-tiles stacked per dot (TileConfig.int4_stack); int4s: no inline-PTX pair dequantization
    formats = {"bf16": (dense, DENSE, {}), "int4": (quant, INT4 + extra, {}),
               **{f"int4x{st}": (quant, [(*c[:5], 0, st) for c in INT4 + extra], {}) for st in (2, 4, 8)},
               "int4s": (quant, [(*c[:5], 0, 1, False) for c in INT4 + extra], {}),
               "fp8": (fp8_w, DENSE, {"fp8_activations": False}), "fp8a8": (fp8_w, W8A8, {"fp8_activations": True})}
    results = {}
    for m in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(E * m, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
        counts = torch.full((E,), m, device="cuda", dtype=torch.int32)
        for name in args.formats.split(","):
            w, cands, kw = formats[name]
            r = sweep(x, counts, w, cands, group_only=name in args.group_only.split(","), **kw)
            results[f"{name}-{m}"] = r
            print(name, m, json.dumps(r), flush=True)
        del x
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
