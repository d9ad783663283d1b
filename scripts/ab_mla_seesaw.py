"""A/B timing of variant copies of `kernels/mla_seesaw.py` against the file itself: stage 1 of MLA
decode alone (equal lengths; one unit a sequence, which writes the output, or --splits N units,
which write fp32 partials for stage 2), each variant captured in a CUDA graph on the
same inputs, in interleaved rounds (the least time of each kept), so that clock drift and the
spread between machines (up to 7% on the lent H100s) fall on every variant alike.

  python scripts/ab_mla_seesaw.py variant.py [...] [--rounds 5] [--splits 1] [--shapes 128x64x4096,...]
      [--out ab.json]   (sm_90)

A variant is the file with one change, for example the output's rescale left out (wrong results:
a bound on what removing that work could gain). Prints us and GB/s (cache bytes over time) per shape.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecluster.cluster.bench.kernels import MLA_RANK, MLA_ROPE, MLA_SCALE_LOG2, graph_ms, mla_inputs  # noqa: E402
from moecluster.kernels import mla_seesaw  # noqa: E402
from moecluster.kernels.mla_decode import stage1_work  # noqa: E402


def shapes(text: str) -> list[tuple[int, int, int]]:
    """"128x64x4096,64x64x32768" -> [(heads, batch, context), ...]"""
    return [tuple(int(v) for v in shape.split("x")) for shape in text.split(",")]


def load_variants(paths: list[str], base: str) -> dict:
    """{base: the committed kernel module, stem: each variant file loaded as a module}."""
    mods = {base: mla_seesaw}
    for path in paths:
        name = Path(path).stem
        if name in mods:
            raise SystemExit(f"two variants named {name!r} (or one named like the committed kernel): rename one")
        spec = importlib.util.spec_from_file_location(f"seesaw_{name}", path)
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    return mods


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="+", help="copies of kernels/mla_seesaw.py with one change each")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--splits", type=int, default=1, help="units a sequence (over 1: the partials' path)")
    ap.add_argument("--shapes", type=shapes, default=shapes("128x64x4096,128x64x32768,128x128x32768,64x64x32768"))
    ap.add_argument("--out", default=None, help="JSON file for the table")
    a = ap.parse_args()
    mods = load_variants(a.variants, "committed")
    gen = torch.Generator("cuda").manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for heads, batch, context in a.shapes:
        q, cache, tables, lens = mla_inputs(batch, context, heads, gen)
        cap = batch * a.splits
        plan, partial, lse = stage1_work(lens, heads, MLA_RANK, heads // mla_seesaw.HEADS, sms, cap, mla_seesaw.TILE,
                                         a.splits, False)
        out = torch.empty(batch, heads, MLA_RANK, device="cuda", dtype=torch.bfloat16)
        us: dict[str, list[float]] = {name: [] for name in mods}
        for _ in range(a.rounds):
            for name, mod in mods.items():
                call = lambda m=mod: m.launch_stage1(q, cache, tables, out, partial, lse, plan, cap, MLA_SCALE_LOG2)  # noqa: E731
                us[name].append(graph_ms(call) * 1e3)
        nbytes = batch * context * (MLA_RANK + MLA_ROPE) * cache.element_size()
        row = {"heads": heads, "batch": batch, "context": context, "splits": a.splits, **{f"{k}_us": min(v) for k, v in us.items()}}
        rows.append(row)
        print(f"{heads} heads x {batch} x {context}: " + "  ".join(
            f"{k} {min(v):.1f} us ({nbytes / min(v) / 1e3:.0f} GB/s)" for k, v in us.items()), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rounds": a.rounds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
