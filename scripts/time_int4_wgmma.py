"""The Gluon INT4 kernel (`kernels/int4_wgmma.py`) against the Triton one on a Hopper GPU:
correctness (both kernels and the torch reference, gate_up and down, contiguous and gathered
rows, uneven counts) and per-kernel times over a tile sweep at DeepSeek-V3 / Kimi-K2 expert shapes
(32 local experts, H 7168, I 2048), beside `torch._grouped_mm` bf16 on the same shapes.

    OUT=. python scripts/time_int4_wgmma.py 8,16,32,64,128     # writes $OUT/int4-wgmma.json
    OUT=. python scripts/time_int4_wgmma.py 1,2,8 384          # 384 local experts (Kimi K2 on one GPU)
"""

from __future__ import annotations

import json
import os
import sys

import torch
from triton.testing import do_bench

from moecluster.cluster.bench.kernels import random_int4
from moecluster.kernels import fused_moe as fm
from moecluster.kernels import int4_wgmma as iw
from moecluster.kernels.fused_moe_ref import grouped_mlp_reference

E, H, I = int(sys.argv[2]) if len(sys.argv) > 2 else 32, 7168, 2048  # noqa: E741
SWEEP = [iw.WgmmaTiles(*t) for t in ((16, 64, 4, 2), (16, 64, 4, 3), (16, 64, 4, 4), (16, 128, 8, 2), (16, 128, 8, 3),
                                     (16, 128, 4, 2), (16, 256, 8, 2),
                                     (32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2), (64, 128, 4, 2))]


def gluon_gemm(a, src, counts, w: fm.Int4Experts, which: str, c, rows: int, tiles: iw.WgmmaTiles) -> None:
    gated = which == "gate_up"
    q0, q1 = (w.gate, w.up) if gated else (w.down, w.down)
    n, k = (I, H) if gated else (H, I)
    iw.launch(a, src, counts, q0.packed, q0.scale, q1.packed, q1.scale, c, rows, n, k, gated, q0.group_size,
              fm._MAGIC[torch.bfloat16][0], tiles)


def check(w: fm.Int4Experts, g: torch.Generator) -> dict:
    """max |gluon - triton| and |gluon - reference| relative to the reference's max, per case."""
    out = {}
    for m, gather, uneven in ((64, False, False), (40, True, True), (8, False, True), (130, True, False)):
        counts = torch.full((E,), m, dtype=torch.int32)
        if uneven:
            counts = torch.randint(0, 2 * m, (E,), generator=torch.Generator().manual_seed(m), dtype=torch.int32)
            counts[3] = 0
        rows = int(counts.sum())
        counts = counts.cuda()
        x = torch.randn(rows + (5 if gather else 0), H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
        src = torch.randperm(rows + 5, device="cuda", generator=g)[:rows] if gather else None
        ref = grouped_mlp_reference(x, counts, w, src_rows=src)
        gu, dn = fm.default_tiles(rows, w, x.dtype)  # explicit tiles: the Triton kernel
        tri = fm.grouped_mlp(x, counts, w, src_rows=src, gate_up_tiles=gu, down_tiles=dn)
        for tiles in (iw.WgmmaTiles(), iw.WgmmaTiles(16, 128, 8, 3), iw.WgmmaTiles(32, 128, 4, 2)):
            h = torch.full((rows, I), float("nan"), device="cuda", dtype=torch.bfloat16)
            o = torch.full((rows, H), float("nan"), device="cuda", dtype=torch.bfloat16)
            gluon_gemm(x, src, counts, w, "gate_up", h, rows, tiles)
            gluon_gemm(h, None, counts, w, "down", o, rows, tiles)
            scale = ref.float().abs().max().item()
            key = f"m{m} gather{gather} uneven{uneven} {tiles.block_t}x{tiles.block_n}x{tiles.num_warps}x{tiles.stages}"
            out[key] = {"vs_triton": (o.float() - tri.float()).abs().max().item() / scale,
                        "vs_ref": (o.float() - ref.float()).abs().max().item() / scale,
                        "triton_vs_ref": (tri.float() - ref.float()).abs().max().item() / scale,
                        "nan": bool(o.isnan().any())}
            print(key, out[key], flush=True)
    return out


def time_sizes(sizes: list[int], w: fm.Int4Experts, g: torch.Generator) -> dict:
    wb = [torch.randn(E, o, i, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02 for o, i in ((2 * I, H), (H, I))]
    out = {}
    for m in sizes:
        rows = E * m
        x = torch.randn(rows, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
        counts = torch.full((E,), m, device="cuda", dtype=torch.int32)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        hb = torch.empty(rows, I, device="cuda", dtype=torch.bfloat16)
        o = torch.empty(rows, H, device="cuda", dtype=torch.bfloat16)

        def grouped_mm() -> None:
            gu = torch._grouped_mm(x, wb[0].transpose(1, 2), offs=offs)
            hh = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
            torch._grouped_mm(hh, wb[1].transpose(1, 2), offs=offs)

        res = {"grouped_mm_bf16": do_bench(grouped_mm, warmup=5, rep=50, return_mode="median")}
        gu_t, dn_t = fm.default_tiles(rows, w, x.dtype)
        res["triton"] = [do_bench(lambda: fm._launch_gemm(x, None, None, counts, w, "gate_up", hb, rows, I, H, gu_t),
                                  warmup=5, rep=50, return_mode="median"),
                         do_bench(lambda: fm._launch_gemm(hb, None, None, counts, w, "down", o, rows, H, I, dn_t),
                                  warmup=5, rep=50, return_mode="median")]
        for t in SWEEP:
            if t.block_t > max(16, 2 * m) or t.block_t < min(m, 64):
                continue
            key = f"{t.block_t}x{t.block_n}x{t.num_warps}x{t.stages}"
            try:
                res[key] = [do_bench(lambda: gluon_gemm(x, None, counts, w, "gate_up", hb, rows, t), warmup=5, rep=50,
                                     return_mode="median"),
                            do_bench(lambda: gluon_gemm(hb, None, counts, w, "down", o, rows, t), warmup=5, rep=50,
                                     return_mode="median")]
            except Exception as e:  # noqa: BLE001 - a configuration that does not fit is reported
                print("ERR", key, type(e).__name__, str(e)[:300], flush=True)
                res[key] = [float("nan"), float("nan")]
        best = min((k for k in res if k not in ("grouped_mm_bf16", "triton")), key=lambda k: sum(res[k]))
        for k_, v in res.items():
            print(f"{m:4d} {k_:>16} {v if isinstance(v, float) else [round(x_, 4) for x_ in v]}", flush=True)
        print(f"{m:4d} best {best} sum {sum(res[best]):.4f} triton {sum(res['triton']):.4f} grouped_mm "
              f"{res['grouped_mm_bf16']:.4f} -> gluon x{res['grouped_mm_bf16'] / sum(res[best]):.2f} triton "
              f"x{res['grouped_mm_bf16'] / sum(res['triton']):.2f}", flush=True)
        out[str(m)] = res
    return out


def main() -> None:
    sizes = [int(s) for s in sys.argv[1].split(",")]
    g = torch.Generator(device="cuda").manual_seed(0)
    ckpt = [random_int4(E, o, i, g) for o, i in ((I, H), (I, H), (H, I))]
    w = fm.Int4Experts.from_compressed_tensors(*ckpt, H, I, k_block=256)
    result = {"check": check(w, g) if E <= 32 else {}}  # (the fp32 reference over 384 experts is slow)
    result["times"] = time_sizes(sizes, w, g)
    with open(os.path.join(os.environ.get("OUT", "."), "int4-wgmma.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
