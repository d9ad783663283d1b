"""Launch MLA decode a few times at one shape for Nsight Compute (the kernel the launcher picks):
    ncu --kernel-name regex:mla_seesaw --section ... python scripts/ncu_mla.py [--heads 128] [--batch 64]
        [--context 4096] [--hot-pages N]
--hot-pages N points every block-table entry into the first N pages (the cache stays in L2)."""

from __future__ import annotations

import argparse

import torch

from moecluster.kernels.mla_decode import mla_decode
from time_mla_paths import RANK, make_inputs  # scripts/ is on sys.path when this runs as a script

p = argparse.ArgumentParser()
p.add_argument("--heads", type=int, default=128)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--context", type=int, default=4096)
p.add_argument("--hot-pages", type=int, default=0)
p.add_argument("--calls", type=int, default=3)
args = p.parse_args()

q, cache, tables, lens = make_inputs(args.heads, args.batch, args.context, args.hot_pages,
                                     torch.Generator(device="cuda").manual_seed(0))
for _ in range(args.calls):
    mla_decode(q, cache, tables, lens, 192**-0.5, RANK)
torch.cuda.synchronize()
