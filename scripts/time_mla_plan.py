"""Times the MLA decode work plan (`kernels/mla_schedule.py`) on its own and the whole decode
call, both replayed in CUDA graphs, at equal and mixed lengths: what the plan adds to a decode
call, and with --splits the same calls at fixed unit counts (to check the plan's choice).

  python scripts/time_mla_plan.py [--splits 1,2,4] [--out FILE]   (GPU)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecluster.cluster.bench.kernels import MLA_RANK, MLA_SCALE, graph_ms, mla_inputs  # noqa: E402
from moecluster.kernels import mla_schedule  # noqa: E402
from moecluster.kernels.mla_decode import mla_decode  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--splits", type=lambda t: [int(v) for v in t.split(",")], default=[],
                    help="also time these fixed unit counts for the longest sequence, e.g. 1,2,3,4,6,8")
    args = ap.parse_args()
    gen = torch.Generator("cuda").manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for heads in (128, 64):
        for batch in (64, 128):
            for context in (4096, 32768):
                for mixed in (False, True):
                    q, cache, tables, lens = mla_inputs(batch, context, heads, gen, mixed)
                    hb = heads // 64  # the seesaw kernel's head blocks, one program an SM
                    cap = mla_schedule.capacity(batch, hb, sms)
                    plan_ms = graph_ms(lambda: mla_schedule.launch_plan(lens, hb, sms, cap, 64, 0, False))
                    units, plan, n = mla_schedule.launch_plan(lens, hb, sms, cap, 64, 0, False)
                    ms = graph_ms(lambda: mla_decode(q, cache, tables, lens, MLA_SCALE, MLA_RANK))
                    row = dict(heads=heads, batch=batch, context=context, mixed=mixed, plan_us=plan_ms * 1e3,
                               decode_us=ms * 1e3, units=int(n), max_units_per_seq=int(plan[:, 1].max()))
                    for s in args.splits:  # the same call with the longest sequence cut in s units
                        row[f"decode_us_s{s}"] = graph_ms(
                            lambda: mla_decode(q, cache, tables, lens, MLA_SCALE, MLA_RANK, num_splits=s)) * 1e3
                    rows.append(row)
                    print(row, flush=True)
                    del cache
                    torch.cuda.empty_cache()
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
