"""Stage 1 of MLA decode on the Gluon kernel alone (one unit a sequence, so it writes the output),
with the output stored by TMA through shared memory against plain stores (a strided view of the
output takes them; the store is a run-time flag of the kernel, though the strided output's strides
also make a second specialization of it), on the same inputs and in one process: the fixed cost of
each store, and whether the loop costs the same.

  python scripts/time_mla_output_store.py [--heads 128] [--batch 64] [--contexts 128,1024,4096,32768]   (H100/H200)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecluster.cluster.bench.kernels import MLA_RANK, MLA_SCALE_LOG2, graph_ms, mla_inputs  # noqa: E402
from moecluster.kernels import mla_seesaw  # noqa: E402
from moecluster.kernels.mla_decode import stage1_work  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--contexts", type=lambda t: [int(v) for v in t.split(",")], default=[128, 1024, 4096, 32768])
    a = ap.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for context in a.contexts:
        q, cache, tables, lens = mla_inputs(a.batch, context, a.heads, gen)
        cap = a.batch  # one unit a sequence: stage 1 writes the output
        plan, partial, lse = stage1_work(lens, a.heads, MLA_RANK, a.heads // mla_seesaw.HEADS, sms, cap, mla_seesaw.TILE, 1,
                                         False)
        outs = {"TMA": torch.empty(a.batch, a.heads, MLA_RANK, device="cuda", dtype=torch.bfloat16),
                "plain": torch.empty(a.batch, a.heads, MLA_RANK + 8, device="cuda", dtype=torch.bfloat16)[..., :MLA_RANK]}
        us = {name: graph_ms(lambda o=o: mla_seesaw.launch_stage1(q, cache, tables, o, partial, lse, plan, cap, MLA_SCALE_LOG2)) * 1e3
              for name, o in outs.items()}
        torch.testing.assert_close(outs["TMA"], outs["plain"], rtol=0, atol=0)
        print(f"heads {a.heads}, batch {a.batch}, context {context}: stage 1 with TMA stores {us['TMA']:.1f} us, "
              f"with plain stores {us['plain']:.1f} us", flush=True)


if __name__ == "__main__":
    main()
