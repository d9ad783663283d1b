"""Scratch: time MLA decode variants on one GPU (deleted after the sweep)."""
import json, os, sys, time
import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
import _mla_exp as exp  # noqa: E402
import moecluster.kernels.mla_decode as new  # noqa: E402

T0 = time.time()
OUT = os.environ.get("OUT", "/tmp")
COPY = 3021.0
results = []


def make(batch, context, heads, gen, ragged=False):
    rank, rope, block = 512, 64, 64
    dim = rank + rope
    lens = torch.randint(1, context + 1, (batch,), generator=gen) if ragged else torch.full((batch,), context)
    bps = -(-context // block)
    nb = batch * bps
    cache = torch.randn(nb, block, dim, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(nb, device="cuda").view(batch, bps).to(torch.int32)
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    return q, cache, tables, lens.to("cuda", torch.int32), dim**-0.5, rank


def run(name, args):
    if name == "cur":
        return new.mla_decode(*args)
    if name.startswith("pf"):
        exp._PREFETCH_AHEAD = int(name[2])
        kw = dict(block_n=32, num_stages=4) if name.endswith("b32") else {}
        return exp.mla_decode(*args, **kw)
    raise KeyError(name)


names = sys.argv[1].split(",")
gen = torch.Generator().manual_seed(0)
for heads in (128, 64):
    args = make(12, 3000, heads, gen, ragged=True)
    ref = new.mla_decode_reference(args[0].float(), args[1].float(), *args[2:])
    for n in names:
        o = run(n, args).float()
        print(f"check {n} h{heads}: rel err {((o - ref).norm() / ref.norm()).item():.2e} max {(o - ref).abs().max().item():.3e}", flush=True)
    del args, ref

SHAPES = [(64, 64, 4096), (128, 64, 4096), (64, 128, 32768), (128, 128, 32768), (64, 64, 32768), (128, 64, 32768), (64, 128, 4096), (128, 128, 4096)]
for heads, batch, ctx in SHAPES:
    args = make(batch, ctx, heads, gen)
    nbytes = (batch * ctx * 576 + batch * heads * (576 + 512)) * 2
    line = []
    for n in names:
        ms = float(do_bench(lambda: run(n, args), warmup=10, rep=40, return_mode="median"))
        gbs = nbytes / ms / 1e6
        results.append(dict(variant=n, heads=heads, batch=batch, context=ctx, ms=ms, gbs=gbs))
        line.append(f"{n}={ms:.3f}ms/{100*gbs/COPY:.1f}%")
    print(f"h{heads} b{batch} ctx{ctx}: " + "  ".join(line) + f"  t={time.time()-T0:.0f}s", flush=True)
    del args
    torch.cuda.empty_cache()
json.dump(results, open(os.path.join(OUT, "sweep.json"), "w"), indent=1)
print("done", time.time() - T0)
