"""Time the two MLA decode stage-1 kernels (Triton, Gluon seesaw) at the bench shapes, eager and
inside a CUDA graph (launch costs excluded), and check them against each other and an fp32
reference on a few sequences.

    python scripts/time_mla_paths.py [--heads 128,64] [--batches 64,128] [--contexts 4096,32768]
        [--splits N] [--hot-pages N] [--out mla-paths.json]

--hot-pages N is a diagnostic: every block-table entry points into the first N pages, so the
kernels read a cache that stays in L2 (the bytes counted are still the logical ones). Against the
normal run it separates the cost of DRAM latency and bandwidth from the kernel's own schedule.

Prints a table; writes JSON with --out. GPU only (sm_90 for the seesaw kernel).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from moecluster.cluster.bench.kernels import _time_ms, graph_ms
from moecluster.kernels.mla_decode import mla_decode, mla_decode_reference

RANK, ROPE, PAGE = 512, 64, 64


def make_inputs(heads: int, batch: int, context: int, hot_pages: int,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (batch, heads, 576), a bf16 cache of pages of 64 x 576, shuffled block tables (every entry in
    the first `hot_pages` pages when given) and lengths of `context` tokens, on the GPU."""
    blocks = batch * context // PAGE
    cache = torch.randn(blocks, PAGE, RANK + ROPE, device="cuda", dtype=torch.bfloat16, generator=gen)
    tables = torch.randperm(blocks, device="cuda", generator=gen).view(batch, -1).to(torch.int32)
    if hot_pages:
        tables %= hot_pages
    lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, heads, RANK + ROPE, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, cache, tables, lens


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", default="128,64")
    ap.add_argument("--batches", default="64,128")
    ap.add_argument("--contexts", default="4096,32768")
    ap.add_argument("--splits", type=int, default=None, help="units for the longest sequence (mla_decode num_splits)")
    ap.add_argument("--paths", default="triton,seesaw", help="which kernels to time (the first is the baseline)")
    ap.add_argument("--hot-pages", type=int, default=0, help="point every block-table entry into the first N pages")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for heads in _ints(args.heads):
        for batch in _ints(args.batches):
            for context in _ints(args.contexts):
                q, cache, tables, lens = make_inputs(heads, batch, context, args.hot_pages, gen)
                scale = 192**-0.5
                nbytes = (batch * context * (RANK + ROPE) + q.numel() + batch * heads * RANK) * 2
                row = {"heads": heads, "batch": batch, "context": context, "hot_pages": args.hot_pages}
                outs = {}
                for path, env in (("triton", "0"), ("seesaw", "1")):
                    if path not in args.paths.split(","):
                        continue
                    os.environ["MOECLUSTER_MLA_SEESAW"] = env
                    call = lambda: mla_decode(q, cache, tables, lens, scale, RANK, num_splits=args.splits)  # noqa: E731
                    outs[path] = call().float()
                    row[f"{path}_eager_ms"] = _time_ms(call)
                    row[f"{path}_graph_ms"] = graph_ms(call)
                    row[f"{path}_graph_gbs"] = nbytes / (row[f"{path}_graph_ms"] * 1e-3) / 1e9
                sub = slice(0, 4)
                exact = mla_decode_reference(q[sub].float(), cache.float(), tables[sub], lens[sub], scale, RANK)
                for path, out in outs.items():
                    row[f"{path}_rel_err"] = ((out[sub] - exact).norm() / exact.norm()).item()
                if len(outs) == 2:
                    row["max_abs_diff"] = (outs["seesaw"] - outs["triton"]).abs().max().item()
                rows.append(row)
                print(json.dumps(row), flush=True)
                del cache, tables, q, outs
                torch.cuda.empty_cache()
    paths = [p for p in ("triton", "seesaw") if p in args.paths.split(",")]
    hdr = ["heads", "batch", "context"]
    for p in paths:
        hdr += [f"{p} eager ms", f"{p} graph ms", f"{p} graph GB/s", f"{p} rel err"]
    print(" | ".join(hdr))
    for r in rows:
        cells = [str(r["heads"]), str(r["batch"]), str(r["context"])]
        for p in paths:
            cells += [f"{r[p + '_eager_ms']:.3f}", f"{r[p + '_graph_ms']:.3f}", f"{r[p + '_graph_gbs']:.0f}",
                      f"{r[p + '_rel_err']:.1e}"]
        print(" | ".join(cells))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
