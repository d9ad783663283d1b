"""Launch MLA decode a few times at one shape for Nsight Compute (the kernel the launcher picks):
    ncu --kernel-name regex:mla_seesaw --section ... python scripts/ncu_mla.py [--heads 128] [--batch 64]
        [--context 4096] [--hot-pages N]
--hot-pages N points every block-table entry into the first N pages (the cache stays in L2)."""

from __future__ import annotations

import argparse

import torch

from moecluster.kernels.mla_decode import mla_decode

RANK, ROPE, PAGE = 512, 64, 64

p = argparse.ArgumentParser()
p.add_argument("--heads", type=int, default=128)
p.add_argument("--batch", type=int, default=64)
p.add_argument("--context", type=int, default=4096)
p.add_argument("--hot-pages", type=int, default=0)
p.add_argument("--calls", type=int, default=3)
args = p.parse_args()

g = torch.Generator(device="cuda").manual_seed(0)
blocks = args.batch * args.context // PAGE
cache = torch.randn(blocks, PAGE, RANK + ROPE, device="cuda", dtype=torch.bfloat16, generator=g)
tables = torch.randperm(blocks, device="cuda", generator=g).view(args.batch, -1).to(torch.int32)
if args.hot_pages:
    tables %= args.hot_pages
lens = torch.full((args.batch,), args.context, device="cuda", dtype=torch.int32)
q = torch.randn(args.batch, args.heads, RANK + ROPE, device="cuda", dtype=torch.bfloat16, generator=g)
for _ in range(args.calls):
    mla_decode(q, cache, tables, lens, 192**-0.5, RANK)
torch.cuda.synchronize()
