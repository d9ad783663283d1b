"""Scratch: time MLA decode variants on one GPU (deleted after the sweep)."""
import json, os, sys, time
import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
import _mla_orig as orig  # noqa: E402
import moecluster.kernels.mla_decode as new  # noqa: E402

T0 = time.time()
BUDGET = float(os.environ.get("SWEEP_BUDGET", "240"))
OUT = os.environ.get("OUT", "/tmp")
COPY = 3021.0
results = []


def make(batch, context, heads, gen, ragged=False):
    rank, rope, block = 512, 64, 64
    dim = rank + rope
    if ragged:
        lens = torch.randint(1, context + 1, (batch,), generator=gen)
    else:
        lens = torch.full((batch,), context)
    bps = -(-context // block)
    nb = batch * bps
    cache = torch.randn(nb, block, dim, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(nb, device="cuda").view(batch, bps).to(torch.int32)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    return q, cache, tables, lens.to("cuda", torch.int32), dim**-0.5, rank


def call(var, args, **extra):
    name, mod, knobs, tma = var
    if mod is new:
        new._USE_TMA = tma
    return mod.mla_decode(*args, **knobs, **extra)


VARIANTS = {
    "orig": ("orig", orig, {}, False),
    "gather64": ("gather64", new, dict(block_n=64, num_stages=2), False),
    "tma64": ("tma64", new, dict(block_n=64, num_stages=2), True),
    "tma32s3": ("tma32s3", new, dict(block_n=32, num_stages=3), True),
    "tma32s4": ("tma32s4", new, dict(block_n=32, num_stages=4), True),
    "gather32s4": ("gather32s4", new, dict(block_n=32, num_stages=4), False),
    "tma16s8": ("tma16s8", new, dict(block_n=16, num_stages=8), True),
}
names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(VARIANTS)

gen = torch.Generator().manual_seed(0)
# correctness (ragged lengths, both head counts) + compile
for heads in (128, 64):
    args = make(12, 3000, heads, gen, ragged=True)
    ref = new.mla_decode_reference(args[0].float(), args[1].float(), *args[2:])
    for n in names:
        try:
            o = call(VARIANTS[n], args).float()
            torch.cuda.synchronize()
            err = ((o - ref).norm() / ref.norm()).item()
            print(f"check {n} heads {heads}: rel err {err:.2e} max {(o - ref).abs().max().item():.3e}  t={time.time()-T0:.0f}s", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"check {n} heads {heads}: FAILED {e!r}"[:400], flush=True)
            VARIANTS[n] = None
    del args, ref

SHAPES = [(64, 64, 4096), (128, 64, 4096), (64, 128, 32768), (128, 128, 32768), (64, 64, 32768), (128, 64, 32768), (64, 128, 4096), (128, 128, 4096)]
for heads, batch, ctx in SHAPES:
    args = make(batch, ctx, heads, gen)
    nbytes = (batch * ctx * 576 + batch * heads * (576 + 512)) * 2
    for n in names:
        if VARIANTS[n] is None or time.time() - T0 > BUDGET:
            continue
        ms = float(do_bench(lambda: call(VARIANTS[n], args), warmup=10, rep=40, return_mode="median"))
        gbs = nbytes / ms / 1e6
        results.append(dict(variant=n, heads=heads, batch=batch, context=ctx, ms=ms, gbs=gbs))
        print(f"{n:12s} h{heads:4d} b{batch:4d} ctx{ctx:6d}  {ms:7.3f} ms {gbs:7.0f} GB/s {100*gbs/COPY:5.1f}%  t={time.time()-T0:.0f}s", flush=True)
    del args
    torch.cuda.empty_cache()

# split sweep for the extra variants named in SPLITS
for n in os.environ.get("SPLIT_VARIANTS", "").split(","):
    if not n or VARIANTS.get(n) is None:
        continue
    for heads, batch, ctx in [(64, 64, 4096), (128, 128, 4096), (64, 128, 32768)]:
        if time.time() - T0 > BUDGET:
            break
        args = make(batch, ctx, heads, gen)
        nbytes = (batch * ctx * 576 + batch * heads * (576 + 512)) * 2
        for s in (1, 2, 3, 4, 6):
            ms = float(do_bench(lambda: call(VARIANTS[n], args, num_splits=s), warmup=10, rep=30, return_mode="median"))
            print(f"split {n} h{heads} b{batch} ctx{ctx} s={s}: {ms:.3f} ms {nbytes/ms/1e6/COPY*100:.1f}%", flush=True)
        del args
json.dump(results, open(os.path.join(OUT, "sweep.json"), "w"), indent=1)
print("done", time.time() - T0)
