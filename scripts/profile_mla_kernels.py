"""Per-kernel GPU times of one MLA decode call, ours and FlashMLA's, from torch.profiler: which
launch (plan, stage 1, stage 2; FlashMLA's metadata, main and combine kernels) takes the time.

  python scripts/profile_mla_kernels.py [--heads 128] [--batch 64] [--context 4096] [--mixed]   (GPU)
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecluster.cluster.bench.kernels import MLA_RANK, MLA_SCALE, _flashmla, mla_inputs  # noqa: E402
from moecluster.kernels.mla_decode import mla_decode  # noqa: E402

CALLS = 50


def profile(name: str, fn) -> None:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name[:70]] += e.device_time_total / CALLS
    total = sum(per_kernel.values())
    print(f"{name}: {total:.1f} us of kernels a call")
    for k, us in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
        print(f"  {us:8.1f} us  {k}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--mixed", action="store_true")
    a = ap.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    q, cache, tables, lens = mla_inputs(a.batch, a.context, a.heads, gen, a.mixed)
    print(f"heads {a.heads}, batch {a.batch}, context {a.context}, {'mixed' if a.mixed else 'equal'} lengths")
    profile("ours", lambda: mla_decode(q, cache, tables, lens, MLA_SCALE, MLA_RANK))
    fm = _flashmla()
    if fm is not None:
        meta, _ = fm.get_mla_metadata()
        profile("FlashMLA", lambda: fm.flash_mla_with_kvcache(q.unsqueeze(1), cache.unsqueeze(2), tables, lens, MLA_RANK,
                                                              meta, softmax_scale=MLA_SCALE))


if __name__ == "__main__":
    main()
