"""Launch the Gluon INT4 gate_up GEMM a few times at 64 rows per expert for Nsight Compute:
    ncu --kernel-name int4_wgmma_kernel --section ... python scripts/ncu_int4_wgmma.py [tiles ...]
tiles as block_t-block_n-warps-stages (default 64-128-8-2 64-128-8-3)."""

from __future__ import annotations

import sys

import torch

from moecluster.cluster.bench.kernels import random_int4
from moecluster.kernels import fused_moe as fm
from moecluster.kernels import int4_wgmma as iw

E, H, I, M = 32, 7168, 2048, 64  # noqa: E741

g = torch.Generator(device="cuda").manual_seed(0)
w = fm.Int4Experts.from_compressed_tensors(*[random_int4(E, o, i, g) for o, i in ((I, H), (I, H), (H, I))], H, I, k_block=256)
x = torch.randn(E * M, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
counts = torch.full((E,), M, device="cuda", dtype=torch.int32)
h = torch.empty(E * M, I, device="cuda", dtype=torch.bfloat16)
for spec in sys.argv[1:] or ["64-128-8-2", "64-128-8-3"]:
    bt, bn, nw, st = (int(v) for v in spec.split("-"))
    for _ in range(2):
        iw.launch(x, None, counts, w.gate.packed, w.gate.scale, w.up.packed, w.up.scale, h, E * M, I, H, True, 32,
                  fm._MAGIC[torch.bfloat16][0], iw.WgmmaTiles(bt, bn, nw, st))
torch.cuda.synchronize()
