"""Per-kernel times of the INT4 fused-MoE GEMMs (gate_up and down launched alone) on a GPU, for
the configurations in C, at DeepSeek-V3 / Kimi-K2 expert shapes (32 local experts), with the
repack's k_block 128 and 256: the data behind `kernels/moe_tiles.py::_int4_tiles`. Launch order
group_m 4 (8 from 512 rows), where the defaults use 0 up to 128 rows per expert.

    OUT=. python scripts/time_int4_kernels.py 8,32,64,512      # writes $OUT/probe.json
    OUT=. python scripts/time_int4_kernels.py 8 "128-16-64-256-4-2-1;256-16-64-256-4-2-1"   # these configs only
"""

import json
import os
import sys

import torch
from triton.testing import do_bench
from moecluster.kernels import fused_moe as fm
from moecluster.workers.quant.int4 import pack_int4
E, H, I = 32, 7168, 2048
g = torch.Generator(device="cuda").manual_seed(0)
def int4(o, i):
    q = torch.randint(-8, 8, (E, o, i), device="cuda", dtype=torch.int8, generator=g)
    return pack_int4(q), torch.rand(E, o, i // 32, device="cuda", generator=g).to(torch.bfloat16) * 0.01
ck = (int4(I, H), int4(I, H), int4(H, I))
W = {kb: fm.Int4Experts.from_compressed_tensors(*ck, H, I, k_block=kb) for kb in (128, 256)}
C = {  # m: [(kb, bm, bn, bk, warps, stages, stack)]
 8: [(256, 16, 64, 256, 4, 3, 1), (256, 16, 64, 256, 4, 2, 1), (256, 16, 64, 256, 4, 3, 2), (256, 16, 64, 256, 4, 2, 2),
     (128, 16, 64, 128, 4, 3, 2), (128, 16, 64, 256, 4, 2, 2), (128, 16, 64, 128, 4, 3, 1)],
 32: [(256, 32, 64, 256, 4, 2, 1), (256, 32, 64, 256, 4, 3, 1), (256, 32, 64, 256, 4, 3, 2), (256, 32, 64, 256, 4, 3, 4),
      (256, 64, 64, 256, 4, 3, 4), (128, 32, 64, 128, 4, 2, 1), (128, 32, 64, 128, 4, 3, 2)],
 64: [(256, 64, 64, 256, 4, 3, 4), (256, 64, 64, 256, 8, 3, 4), (256, 64, 64, 256, 4, 2, 4), (256, 64, 64, 256, 4, 3, 2),
      (256, 64, 128, 256, 8, 3, 4), (256, 64, 128, 256, 8, 2, 4), (128, 64, 64, 128, 4, 3, 8), (128, 64, 64, 128, 8, 3, 8),
      (128, 64, 64, 128, 4, 3, 4)],
 512: [(256, 128, 128, 256, 8, 3, 4), (256, 128, 128, 256, 8, 2, 4), (256, 64, 128, 256, 8, 3, 4), (256, 128, 128, 256, 8, 3, 8),
       (128, 128, 128, 128, 8, 3, 8), (128, 128, 128, 128, 8, 2, 8)],
}
if len(sys.argv) > 2:  # kb-bm-bn-bk-warps-stages-stack;... for every size given
    C = {int(m): [tuple(int(v) for v in c.split("-")) for c in sys.argv[2].split(";")] for m in sys.argv[1].split(",")}
out = {}
for m in [int(s) for s in sys.argv[1].split(",")]:
    x = torch.randn(E * m, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    counts = torch.full((E,), m, device="cuda", dtype=torch.int32)
    hb = torch.empty(E * m, I, device="cuda", dtype=torch.bfloat16)
    o = torch.empty(E * m, H, device="cuda", dtype=torch.bfloat16)
    for kb, bm, bn, bk, nw, ns, st in C[m]:
        w = W[kb]
        t = fm.TileConfig(bm, bn, bk, nw, ns, 8 if m >= 512 else 4, int4_stack=st)
        res = []
        for which, c, a, n, k in (("gate_up", hb, x, I, H), ("down", o, hb, H, I)):
            try:
                ms = do_bench(lambda: fm._launch_gemm(a, None, None, counts, w, which, c, E * m, n, k, t), warmup=3, rep=25, return_mode="median")
            except Exception as e:
                print("ERR", type(e).__name__, str(e)[:200]); ms = float("nan")
            res.append(ms)
        out[f"{m} kb{kb} {bm}x{bn}x{bk}x{nw}x{ns} s{st}"] = res
        print(f"{m:4d} kb{kb} {bm}x{bn}x{bk}x{nw}x{ns} stack{st}  gate_up {res[0]:.4f}  down {res[1]:.4f}  sum {sum(res):.4f}", flush=True)
json.dump(out, open(os.environ["OUT"] + "/probe.json", "w"), indent=1)
