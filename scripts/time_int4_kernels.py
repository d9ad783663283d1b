"""Per-kernel times of the INT4 fused-MoE GEMMs (gate_up and down launched alone) on a GPU, for
the configurations in CONFIGS, at DeepSeek-V3 / Kimi-K2 expert shapes (32 local experts), with the
repack's k_block 128 and 256: the data behind `kernels/moe_tiles.py::_int4_tiles`. Launch order
group_m 4 (8 from 512 rows), where the defaults use 0 up to 128 rows per expert.

    OUT=. python scripts/time_int4_kernels.py 8,32,64,512      # writes $OUT/probe.json
    OUT=. python scripts/time_int4_kernels.py 8 "128-16-64-256-4-2-1;256-16-64-256-4-2-1"   # these configs only
"""

from __future__ import annotations

import json
import os
import sys

import torch
from triton.testing import do_bench

from moecluster.cluster.bench.kernels import random_int4
from moecluster.kernels import fused_moe as fm

E, H, I = 32, 7168, 2048  # noqa: E741
CONFIGS = {  # rows per expert: [(k_block, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, int4_stack)]
    8: [(256, 16, 64, 256, 4, 3, 1), (256, 16, 64, 256, 4, 2, 1), (256, 16, 64, 256, 4, 3, 2), (256, 16, 64, 256, 4, 2, 2),
        (128, 16, 64, 128, 4, 3, 2), (128, 16, 64, 256, 4, 2, 2), (128, 16, 64, 128, 4, 3, 1)],
    32: [(256, 32, 64, 256, 4, 2, 1), (256, 32, 64, 256, 4, 3, 1), (256, 32, 64, 256, 4, 3, 2), (256, 32, 64, 256, 4, 3, 4),
         (256, 64, 64, 256, 4, 3, 4), (128, 32, 64, 128, 4, 2, 1), (128, 32, 64, 128, 4, 3, 2)],
    64: [(256, 64, 64, 256, 4, 3, 4), (256, 64, 64, 256, 8, 3, 4), (256, 64, 64, 256, 4, 2, 4), (256, 64, 64, 256, 4, 3, 2),
         (256, 64, 128, 256, 8, 3, 4), (256, 64, 128, 256, 8, 2, 4), (128, 64, 64, 128, 4, 3, 8), (128, 64, 64, 128, 8, 3, 8),
         (128, 64, 64, 128, 4, 3, 4)],
    512: [(256, 128, 128, 256, 8, 3, 4), (256, 128, 128, 256, 8, 2, 4), (256, 64, 128, 256, 8, 3, 4),
          (256, 128, 128, 256, 8, 3, 8), (128, 128, 128, 128, 8, 3, 8), (128, 128, 128, 128, 8, 2, 8)],
}


def time_kernels(m: int, configs: list[tuple[int, ...]], weights: dict[int, fm.Int4Experts], g: torch.Generator) -> dict:
    """ms of (gate_up, down) per configuration at m rows per expert (nan where it does not compile / fit)."""
    x = torch.randn(E * m, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    counts = torch.full((E,), m, device="cuda", dtype=torch.int32)
    hb = torch.empty(E * m, I, device="cuda", dtype=torch.bfloat16)
    o = torch.empty(E * m, H, device="cuda", dtype=torch.bfloat16)
    out = {}
    for kb, bm, bn, bk, nw, ns, st in configs:
        t = fm.TileConfig(bm, bn, bk, nw, ns, 8 if m >= 512 else 4, int4_stack=st)
        res = []
        for which, c, a, n, k in (("gate_up", hb, x, I, H), ("down", o, hb, H, I)):
            try:
                ms = do_bench(lambda: fm._launch_gemm(a, None, None, counts, weights[kb], which, c, E * m, n, k, t),
                              warmup=3, rep=25, return_mode="median")
            except Exception as e:  # noqa: BLE001 - a configuration that does not fit is reported
                print("ERR", type(e).__name__, str(e)[:200])
                ms = float("nan")
            res.append(ms)
        out[f"{m} kb{kb} {bm}x{bn}x{bk}x{nw}x{ns} s{st}"] = res
        print(f"{m:4d} kb{kb} {bm}x{bn}x{bk}x{nw}x{ns} stack{st}  gate_up {res[0]:.4f}  down {res[1]:.4f}  "
              f"sum {sum(res):.4f}", flush=True)
    return out


def main() -> None:
    sizes = [int(s) for s in sys.argv[1].split(",")]
    configs = CONFIGS
    if len(sys.argv) > 2:  # kb-bm-bn-bk-warps-stages-stack;... for every size given
        configs = {m: [tuple(int(v) for v in c.split("-")) for c in sys.argv[2].split(";")] for m in sizes}
    g = torch.Generator(device="cuda").manual_seed(0)
    ckpt = [random_int4(E, o, i, g) for o, i in ((I, H), (I, H), (H, I))]
    weights = {kb: fm.Int4Experts.from_compressed_tensors(*ckpt, H, I, k_block=kb) for kb in (128, 256)}
    out = {}
    for m in sizes:
        out.update(time_kernels(m, configs[m], weights, g))
    with open(os.path.join(os.environ["OUT"], "probe.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
