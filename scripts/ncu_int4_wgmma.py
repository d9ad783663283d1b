"""Launch the Gluon INT4 GEMMs a few times for Nsight Compute:
    ncu --kernel-name int4_wgmma_kernel --section ... python scripts/ncu_int4_wgmma.py \
        [--experts 32] [--rows 64] [--which gate_up|down] [tiles ...]
tiles as block_t-block_n-warps-stages (default 64-128-8-2 64-128-8-3); --rows is rows per expert."""

from __future__ import annotations

import argparse

import torch

from moecluster.cluster.bench.kernels import random_int4
from moecluster.kernels import fused_moe as fm
from moecluster.kernels import int4_wgmma as iw

H, I = 7168, 2048  # noqa: E741

p = argparse.ArgumentParser()
p.add_argument("--experts", type=int, default=32)
p.add_argument("--rows", type=int, default=64)
p.add_argument("--which", choices=["gate_up", "down"], default="gate_up")
p.add_argument("tiles", nargs="*", default=["64-128-8-2", "64-128-8-3"])
args = p.parse_args()
E, M = args.experts, args.rows

g = torch.Generator(device="cuda").manual_seed(0)
w = fm.Int4Experts.from_compressed_tensors(*[random_int4(E, o, i, g) for o, i in ((I, H), (I, H), (H, I))], H, I, k_block=256)
counts = torch.full((E,), M, device="cuda", dtype=torch.int32)
gated = args.which == "gate_up"
k_in, n_out = (H, I) if gated else (I, H)
x = torch.randn(E * M, k_in, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
out = torch.empty(E * M, n_out, device="cuda", dtype=torch.bfloat16)
first, second = (w.gate, w.up) if gated else (w.down, w.down)
for spec in args.tiles:
    bt, bn, nw, st = (int(v) for v in spec.split("-"))
    for _ in range(2):
        iw.launch(x, None, counts, first.packed, first.scale, second.packed, second.scale, out, E * M, n_out, k_in,
                  gated, 32, fm._MAGIC[torch.bfloat16][0], iw.WgmmaTiles(bt, bn, nw, st))
torch.cuda.synchronize()
