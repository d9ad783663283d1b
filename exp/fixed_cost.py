import sys, math, importlib.util
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecluster.cluster.bench.kernels import graph_ms
from moecluster.kernels import mla_schedule, mla_seesaw
spec = importlib.util.spec_from_file_location("seesaw_nostore", Path(__file__).parent / "seesaw_nostore.py")
nostore = importlib.util.module_from_spec(spec); spec.loader.exec_module(nostore)
gen = torch.Generator("cuda").manual_seed(0)
for heads in (128, 64):
    for batch in (64,):
        for context in (128, 256, 1024, 4096):
            blocks = context // 64
            cache = torch.randn(batch * blocks, 64, 576, device="cuda", dtype=torch.bfloat16, generator=gen)
            tables = torch.randperm(batch * blocks, device="cuda", generator=gen).view(batch, blocks).int()
            lens = torch.full((batch,), context, device="cuda", dtype=torch.int32)
            q = torch.randn(batch, heads, 576, device="cuda", dtype=torch.bfloat16, generator=gen)
            hb = heads // 64
            cap = batch  # one unit a sequence: stage 1 writes the output
            plan = mla_schedule.launch_plan(lens, hb, 132, cap, 64, 1, False)
            out = torch.empty(batch, heads, 512, device="cuda", dtype=torch.bfloat16)
            partial = torch.empty(cap, heads, 512, device="cuda", dtype=torch.float32)
            lse = torch.empty(cap, heads, device="cuda", dtype=torch.float32)
            row = {}
            for name, mod in (("full", mla_seesaw), ("nostore", nostore)):
                row[name] = graph_ms(lambda: mod.launch_stage1(q, cache, tables, out, partial, lse, plan, cap, 1.0)) * 1e3
            print(f"heads {heads} batch {batch} context {context}: stage1 {row['full']:.1f} us, without output stores {row['nostore']:.1f} us", flush=True)
