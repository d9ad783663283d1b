"""Power draw and SM clock while MLA decode runs (GPU): does the cache traffic cost the kernel clock?

Each workload is captured in a CUDA graph (20 calls) and replayed without pause for --seconds while
`nvidia-smi` samples the GPU every --interval-ms: power draw, the enforced power limit, the SM and
memory clocks, the temperature and the clock-event reasons (power cap, thermal, ...). The first
second of each workload is left out (the clock settles). The samples are matched to the timed window
by count from nvidia-smi's start, so the window's edges are approximate; medians are reported. Workloads: a 2 GiB copy and a bf16 8192^3
matmul (the two bounds), stage 1 of our MLA decode at the given shapes (the committed kernel and any
variant copies of `kernels/mla_seesaw.py`, for instance one with the loop's loads removed), and
FlashMLA where `.peers/flashmla` is present, and ours with the block tables folded onto --l2-pages
pages (the cache then read from L2: the same work without the DRAM traffic).

  python scripts/mla_power.py [variant.py ...] [--shapes 128x128x32768,64x128x32768] [--seconds 6]
      [--out power.json]   (sm_90)

Prints a table (time a call, GB/s, median power / limit, median SM clock, share of samples with the
power cap or a thermal reason active) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ab_mla_seesaw import (  # the A/B script beside this one (sys.path[0] is scripts/)
    load_variants,
    shapes,
)

from moecluster.cluster.bench.kernels import (
    MLA_RANK,
    MLA_ROPE,
    MLA_SCALE,
    MLA_SCALE_LOG2,
    _flashmla,
    capture_graph,
    mla_inputs,
)
from moecluster.kernels import mla_seesaw
from moecluster.kernels.mla_decode import stage1_work

# nvidia-smi's fields; the optional ones are dropped where this driver does not know them
FIELDS = ["power.draw", "enforced.power.limit", "clocks.sm", "clocks.mem", "temperature.gpu"]
OPTIONAL = ["power.draw.instant", "clocks_event_reasons.active"]
POWER_CAP, HW_SLOWDOWN, SW_THERMAL, HW_THERMAL, POWER_BRAKE = 0x4, 0x8, 0x20, 0x40, 0x80


def _fields() -> list[str]:
    fields = list(FIELDS)
    for extra in OPTIONAL:
        probe = subprocess.run(["nvidia-smi", f"--query-gpu={','.join([*fields, extra])}", "--format=csv,noheader,nounits"],
                               capture_output=True, text=True, check=False)
        if probe.returncode == 0 and "Field" not in probe.stdout:
            fields.append(extra)
    return fields


def _number(text: str) -> float | None:
    text = text.strip()
    try:
        return float(int(text, 16)) if text.startswith("0x") else float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def sample_while(fn: Callable[[], None], seconds: float, interval_ms: int, fields: list[str]) -> tuple[float, list[dict]]:
    """Replays fn (one graph replay) for `seconds`; returns (ms a replay, nvidia-smi samples past the first second)."""
    gpu = torch.cuda.current_device()
    smi = subprocess.Popen(["nvidia-smi", f"--id={gpu}", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                            f"-lms={interval_ms}"], stdout=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replays = 0
    while time.monotonic() - t0 < 1.0:  # settle
        fn()
        torch.cuda.synchronize()
    t_measure = time.monotonic()
    start.record()
    while time.monotonic() - t0 < seconds:
        for _ in range(10):
            fn()
        replays += 10
        torch.cuda.synchronize()
    stop.record()
    torch.cuda.synchronize()
    t_end = time.monotonic()
    smi.terminate()
    lines, _ = smi.communicate(timeout=10)
    rows = [dict(zip(fields, (_number(v) for v in line.split(",")), strict=False)) for line in lines.splitlines() if line.strip()]
    # nvidia-smi prints a sample every interval from its start: keep those of the measured window
    n_skip = int((t_measure - t0) * 1000 / interval_ms)
    n_keep = int((t_end - t_measure) * 1000 / interval_ms)
    return start.elapsed_time(stop) / replays, rows[n_skip:n_skip + n_keep]


def summary(name: str, ms_call: float, nbytes: float, flop: float, samples: list[dict]) -> dict:
    def med(key: str) -> float | None:
        vals = [s[key] for s in samples if s.get(key) is not None]
        return statistics.median(vals) if vals else None

    reasons = [int(s["clocks_event_reasons.active"]) for s in samples if s.get("clocks_event_reasons.active") is not None]
    share = (lambda mask: sum(1 for r in reasons if r & mask) / len(reasons)) if reasons else (lambda mask: None)
    return {"workload": name, "ms_call": ms_call, "gbs": nbytes / (ms_call * 1e-3) / 1e9 if nbytes else None,
            "tflops": flop / (ms_call * 1e-3) / 1e12 if flop else None, "samples": len(samples),
            "power_w": med("power.draw"), "power_instant_w": med("power.draw.instant"),
            "power_max_w": max((s["power.draw"] for s in samples if s.get("power.draw") is not None), default=None),
            "power_limit_w": med("enforced.power.limit"), "sm_mhz": med("clocks.sm"), "mem_mhz": med("clocks.mem"),
            "temp_c": med("temperature.gpu"), "power_cap_share": share(POWER_CAP),
            "thermal_share": share(SW_THERMAL | HW_THERMAL | HW_SLOWDOWN | POWER_BRAKE)}


Measure = Callable[..., None]  # (name, fn, bytes a call, FLOP a call, calls a graph=20)


def bounds(measure: Measure) -> None:
    """The copy and the matmul: what memory traffic alone and tensor work alone draw."""
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    measure("copy 2 GiB", lambda: dst.copy_(src), 2 * src.numel() * 2, 0, 2)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    measure("bf16 matmul 8192^3", lambda: x @ y, 0, 2 * 8192**3, 4)


def mla_shape(measure: Measure, shape: tuple[int, int, int], mods: dict, l2_pages: int, gen: torch.Generator) -> None:
    """Stage 1 of each kernel module at one shape (equal lengths, a unit a sequence), ours with the
    tables folded onto l2_pages pages, and FlashMLA (with its combine)."""
    heads, batch, context = shape
    q, cache, tables, lens = mla_inputs(batch, context, heads, gen)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    plan, partial, lse = stage1_work(lens, heads, MLA_RANK, heads // mla_seesaw.HEADS, sms, batch, mla_seesaw.TILE, 1, False)
    out = torch.empty(batch, heads, MLA_RANK, device="cuda", dtype=torch.bfloat16)
    nbytes = batch * context * (MLA_RANK + MLA_ROPE) * 2
    flop = 2 * batch * context * heads * (MLA_RANK + MLA_ROPE + MLA_RANK)

    def stage1(mod: object, block_tables: torch.Tensor) -> Callable[[], None]:
        return lambda: mod.launch_stage1(q, cache, block_tables, out, partial, lse, plan, batch, MLA_SCALE_LOG2)

    for name, mod in mods.items():
        measure(f"{name} {heads}x{batch}x{context}", stage1(mod, tables), nbytes, flop)
    if l2_pages:  # the same kernel and work with every tile from a few pages, which stay in L2
        measure(f"ours L2 {l2_pages} pages {heads}x{batch}x{context}", stage1(mla_seesaw, tables % l2_pages), nbytes, flop)
    fm = _flashmla()
    if fm is not None:
        meta, _ = fm.get_mla_metadata()
        q4, k4 = q.unsqueeze(1), cache.unsqueeze(2)

        def flash() -> None:
            fm.flash_mla_with_kvcache(q4, k4, tables, lens, MLA_RANK, meta, softmax_scale=MLA_SCALE)

        flash()  # its split schedule, made once
        measure(f"flashmla {heads}x{batch}x{context}", flash, nbytes, flop)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*", help="copies of kernels/mla_seesaw.py, each timed beside the kernel")
    ap.add_argument("--shapes", type=shapes, default=shapes("128x128x32768,64x128x32768"))
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--interval-ms", type=int, default=100)
    ap.add_argument("--l2-pages", type=int, default=256, help="also time ours with the tables folded onto this many pages (0: not)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    mods = load_variants(a.variants, "ours")
    fields = _fields()
    rows = []

    def measure(name: str, fn: Callable[[], object], nbytes: float, flop: float, calls: int = 20) -> None:
        ms, samples = sample_while(capture_graph(fn, calls).replay, a.seconds, a.interval_ms, fields)
        rows.append(summary(name, ms / calls, nbytes, flop, samples))
        r = rows[-1]
        print(f"{name:34s} {r['ms_call']:8.3f} ms  {(r['gbs'] or 0):6.0f} GB/s  {(r['tflops'] or 0):5.0f} TFLOP/s  "
              f"{r['power_w']} W / {r['power_limit_w']} W  SM {r['sm_mhz']} MHz  mem {r['mem_mhz']} MHz  "
              f"{r['temp_c']} C  cap {r['power_cap_share']}  thermal {r['thermal_share']}", flush=True)

    bounds(measure)
    gen = torch.Generator("cuda").manual_seed(0)
    for shape in a.shapes:
        mla_shape(measure, shape, mods, a.l2_pages, gen)
        torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "fields": fields, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
