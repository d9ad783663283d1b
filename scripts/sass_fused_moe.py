"""Compile the fused MoE GEMM kernel's INT4 variants for sm_90 on a machine without a GPU (the
ptxas inside the triton wheel) and print a digest of each one's SASS: a refactor of the kernel
that leaves every digest unchanged leaves the machine code unchanged; the CPU interpreter cannot
run the inline-PTX path at all.

    python scripts/sass_fused_moe.py [--out digests.json]     # (not under TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moecluster.kernels import fused_moe as fm
from moecluster.kernels.jit import interpreted

# (activation dtype, int4_stack, PTX pairs, gated, BLOCK_M, BLOCK_N, BLOCK_K) at k_block 256 (SUB_K 32)
VARIANTS = [("bf16", 1, True, True, 16, 64, 256), ("bf16", 4, True, True, 64, 64, 256), ("fp16", 1, True, True, 16, 64, 256),
            ("bf16", 1, False, True, 16, 64, 256), ("bf16", 4, False, False, 64, 64, 256), ("bf16", 2, True, True, 32, 32, 256),
            ("fp16", 8, False, True, 64, 64, 256), ("bf16", 4, True, False, 64, 64, 256)]


def compile_int4(dtype: str, stack: int, ptx: bool, gated: bool, bm: int, bn: int, bk: int) -> bytes:
    fn = fm._moe_gemm_kernel
    ptrs = {"a_ptr": f"*{dtype}", "src_ptr": "*i32", "counts_ptr": "*i32", "w0_ptr": "*i32", "s0_ptr": f"*{dtype}",
            "w1_ptr": "*i32", "s1_ptr": f"*{dtype}", "as_ptr": "*i32", "c_ptr": f"*{dtype}"}
    magic_bits, magic_bias = fm._MAGIC[{"bf16": fm.torch.bfloat16, "fp16": fm.torch.float16}[dtype]]
    consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_E=32, GATED=gated, GATHER=False, INT4=True, INT4_STACK=stack,
                  GROUP=32, SUB_K=bk // 8, MAGIC_BITS=magic_bits, MAGIC_BIAS=magic_bias, DEQ_PTX=ptx, EVEN_K=True,
                  IEEE=False, FP8=False, FP8_BN=128, FP8_BK=128, GROUP_M=0, A_FP8=False)
    sig = {name: ptrs.get(name, "constexpr" if name in consts else "i32") for name in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2)).asm["cubin"]


def sass_digest(cubin: bytes) -> tuple[str, int]:
    """sha1 of the SASS instructions (addresses stripped) and their count."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        text = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    lines = [re.sub(r"/\*[0-9a-f]{4,}\*/", "", ln).strip() for ln in text.splitlines() if re.search(r"/\*[0-9a-f]{4}\*/", ln)]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12], len(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if interpreted():
        raise SystemExit("run without TRITON_INTERPRET=1: the kernel must be compiled, not interpreted")
    digests = {}
    for v in VARIANTS:
        digest, n = sass_digest(compile_int4(*v))
        digests[str(v)] = [digest, n]
        print(f"{v}: {digest} ({n} instructions)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(digests, f, indent=1)


if __name__ == "__main__":
    main()
