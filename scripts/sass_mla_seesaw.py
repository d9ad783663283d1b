"""Compile the Gluon MLA decode kernel (`kernels/mla_seesaw.py`, or a variant copy of that file) for
sm_90 on a machine without a GPU and count, in each warpgroup's main loop, the SASS instructions
that matter to it: spill loads and stores (LDL / STL), wgmma (HGMMA), barriers, uniform-register
moves. A change to the kernel can be checked for spills here before it costs device time.

Needs the Triton the GPU machines have (3.6; Gluon's API moves between releases), in its own venv:

    python3 -m venv /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0 torch==2.13.0 numpy
    (any torch serves, it only makes the host-side tensors: here 2.13.0 is the CPU build on local disk)
    /tmp/t36/bin/python scripts/sass_mla_seesaw.py [variant.py ...]  [--sass-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime import driver

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _NoGpuDriver(CudaDriver):
    """The CUDA driver's compile-side answers for an sm_90 target, with no device behind them."""

    def __init__(self) -> None:  # the real one opens libcuda
        pass

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_interface(self) -> types.ModuleType:
        return torch.cuda

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _load(path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"seesaw_variant_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_kernel(mod: types.ModuleType, heads: int = 128) -> bytes:
    """The kernel's cubin for bf16, pages of 64 (the engine's case), compiled without launching."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    batch, dim = 4, mod.KV_LORA + mod.ROPE
    q2 = torch.empty(batch * heads, dim, dtype=torch.bfloat16)
    kv2 = torch.empty(64 * 64, dim, dtype=torch.bfloat16)
    out = torch.empty(batch, heads, mod.KV_LORA, dtype=torch.bfloat16)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    partial = torch.empty(8, heads, mod.KV_LORA)
    descs = [TensorDescriptor.from_tensor(q2, [mod.HEADS, 256], layout),
             TensorDescriptor.from_tensor(q2, [mod.HEADS, mod.ROPE], layout),
             TensorDescriptor.from_tensor(kv2, [mod.TILE, mod.CHUNK], layout),
             TensorDescriptor.from_tensor(kv2, [mod.TILE, mod.ROPE], layout),
             TensorDescriptor.from_tensor(out.view(batch * heads, mod.KV_LORA), [mod.HEADS, mod.CHUNK], layout)]
    tables = torch.empty(batch, 64, dtype=torch.int32)
    lse = torch.empty(8, heads)
    units, seq_plan, num_units = (torch.empty(8, 4, dtype=torch.int32), torch.empty(batch, 2, dtype=torch.int32),
                                  torch.empty(1, dtype=torch.int32))
    f32_layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    descs.append(TensorDescriptor.from_tensor(partial.view(-1, mod.KV_LORA), [mod.HEADS, mod.CHUNK], f32_layout))
    args = dict(zip(("q_desc", "q_rope_desc", "kv_desc", "rope_desc", "out_desc", "part_desc"), descs, strict=False))
    args.update(KvPtr=kv2, BlockTables=tables, Out=out, Partial=partial, Lse=lse, Units=units, SeqPlan=seq_plan,
                NumUnits=num_units, sm_scale_log2=0.1, num_heads=heads, stride_btb=tables.stride(0),
                stride_btn=tables.stride(1), stride_outb=out.stride(0), stride_outh=out.stride(1),
                stride_outd=out.stride(2), stride_pu=partial.stride(0), stride_ph=partial.stride(1),
                stride_pd=partial.stride(2), stride_lu=lse.stride(0), stride_lh=lse.stride(1), PAGE_SIZE=64, out_tma=1)
    fn = mod.mla_seesaw_kernel
    # by the kernel's own argument names, so that a variant with one argument more or less compiles too
    kernel = fn.warmup(**{n: args[n] for n in fn.arg_names}, num_warps=4, grid=(1,))
    return kernel.asm["cubin"]


def sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of every SASS instruction."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    found = (re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in text.splitlines())
    return [(int(m.group(1), 16), m.group(2).strip()) for m in found if m]


def main_loops(ins: list[tuple[int, str]], products: int) -> list[dict[str, int]]:
    """Each warpgroup's pass over the pairs of tiles: the loops (a backward branch and what it spans)
    that hold `products` wgmma instructions. Branches past the last EXIT (the out-of-line retries of
    the barrier waits, which jump back into the loops) are not loops of their own."""
    counts = {"LDL": r"\bLDL", "STL": r"\bSTL", "HGMMA": r"HGMMA", "BAR.SYNC": r"BAR\.SYNC", "R2UR": r"R2UR"}
    last_exit = max(a for a, t in ins if re.search(r"\bEXIT\b", t))
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if not m or addr > last_exit or int(m.group(1), 16) >= addr:
            continue
        body = [t for a, t in ins if int(m.group(1), 16) <= a <= addr]
        row = {k: sum(1 for t in body if re.search(p, t)) for k, p in counts.items()}
        if row["HGMMA"] == products:
            loops.append({"start": int(m.group(1), 16), "end": addr, "instructions": len(body), **row})
    # the innermost: the warp-specialized partitions' dispatch loop spans a whole warpgroup
    inner = [lp for lp in loops if not any(o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"] for o in loops)]
    return [{k: v for k, v in lp.items() if k != "end"} for lp in inner]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variants", nargs="*", help="copies of kernels/mla_seesaw.py (default: the file itself)")
    ap.add_argument("--sass-dir", default=None, help="write each variant's SASS here")
    a = ap.parse_args()
    driver.set_active(_NoGpuDriver())
    paths = a.variants or [str(Path(__file__).resolve().parents[1] / "kernels" / "mla_seesaw.py")]
    for path in paths:
        mod = _load(path)
        ins = sass(compile_kernel(mod))
        # one warpgroup's wgmma a pair: its tile's scores (576 / 16 deep) and two P.V halves (64 / 16 each)
        per_pair = (mod.KV_LORA + mod.ROPE) // 16 + 2 * (mod.TILE // 16)
        print(f"{path}: {len(ins)} instructions")
        for i, loop in enumerate(main_loops(ins, per_pair)):
            print(f"  loop {i} at {loop['start']:#x}: " + ", ".join(f"{k} {v}" for k, v in loop.items() if k != "start"))
        if a.sass_dir:
            Path(a.sass_dir).mkdir(parents=True, exist_ok=True)
            (Path(a.sass_dir) / (Path(path).stem + ".sass")).write_text("\n".join(f"{ad:#07x} {t}" for ad, t in ins))


if __name__ == "__main__":
    main()
