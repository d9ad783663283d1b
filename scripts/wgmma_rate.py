"""How fast Hopper's tensor cores run the two products of MLA decode's Gluon kernel, alone, with
no memory traffic: a ceiling for `kernels/mla_seesaw.py` at 128 heads, where a byte of cache carries
about 240 FLOP and the tensor cores bound the kernel.

Each program (one an SM: its shared memory is the kernel's 216 KiB) runs two warpgroups, as the
kernel does, that repeat one product on operands already in shared memory:

  qk64   S (64, 64)  = q (64, 576) . K (64 tokens, 576)^T   both operands from shared memory, a
                       wgmma per 128 columns (the kernel's score product; each warpgroup its own tile)
  qk128  S (64, 128) = q . K (128 tokens, 576)^T            the same, twice the tokens a product
  pv     O (64, 256) += P (64, 64) . V (64, 256)            P from registers (the kernel's P.V half)

and the same with one warpgroup at work (the other idle), as in the kernel's phases where only one
issues products; prints TFLOP/s over all SMs beside bf16 `torch.matmul` (8192^3) in the same run, and writes JSON.

  python scripts/wgmma_rate.py [--iters 2000] [--out rate.json]   (sm_90)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecluster.cluster.bench.kernels import _time_ms, matmul_tflops

DIM = gl.constexpr(576)  # 512 latent + 64 rope columns
CHUNK = gl.constexpr(128)
_MMA_S64 = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16]))
_MMA_S128 = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 16]))
_MMA_O = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16]))
_P_OP = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_MMA_O.value, k_width=2))


@gluon.jit
def _qk(q_lat, q_rope, k_lat, k_rope, iters, Sink, WG: gl.constexpr, TOKENS: gl.constexpr, LAYOUT: gl.constexpr):
    """iters score products of q against TOKENS rows of the tile buffer (each warpgroup its own rows
    at 64 tokens), a wgmma per CHUNK latent columns and one for the rope columns, waited each time
    as the kernel does."""
    first: gl.constexpr = WG * 64 if TOKENS == 64 else 0
    lat = k_lat.slice(first, TOKENS, dim=0)
    rope = k_rope.slice(first, TOKENS, dim=0)
    total = gl.zeros([64], gl.float32, gl.SliceLayout(1, LAYOUT))
    for _ in range(iters):
        s = gl.zeros([64, TOKENS], gl.float32, LAYOUT)
        for c in gl.static_range(512 // CHUNK):
            s = warpgroup_mma(q_lat.slice(c * CHUNK, CHUNK, dim=1), lat.slice(c * CHUNK, CHUNK, dim=1).permute((1, 0)), s,
                              is_async=True)
        s = warpgroup_mma(q_rope, rope.permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=[s])
        total += gl.sum(s, axis=1)  # keeps each product live
    gl.store(Sink + WG, gl.sum(total, axis=0))


@gluon.jit
def _pv(k_lat, iters, Sink, WG: gl.constexpr):
    """iters P.V half products into one (64, 256) accumulator, P (64, 64) from registers."""
    v = k_lat.slice(WG * 64, 64, dim=0).slice(WG * 256, 256, dim=1)
    p = gl.full([64, 64], 0.001, gl.bfloat16, _P_OP)
    o = gl.zeros([64, 256], gl.float32, _MMA_O)
    for _ in range(iters):
        o = warpgroup_mma(p, v, o, is_async=True)
        o = warpgroup_mma_wait(num_outstanding=0, deps=[o])
    gl.store(Sink + WG, gl.sum(gl.sum(o, axis=1), axis=0))


@gluon.jit
def _part(q_lat, q_rope, k_lat, k_rope, iters, Sink, WG: gl.constexpr, MODE: gl.constexpr):
    if MODE == 0 or (MODE == 3 and WG == 0):
        _qk(q_lat, q_rope, k_lat, k_rope, iters, Sink, WG, 64, _MMA_S64)
    elif MODE == 1:
        _qk(q_lat, q_rope, k_lat, k_rope, iters, Sink, WG, 128, _MMA_S128)
    elif MODE == 2 or (MODE == 4 and WG == 0):
        _pv(k_lat, iters, Sink, WG)


@gluon.jit
def rate_kernel(q_desc, k_desc, iters, Sink, MODE: gl.constexpr):
    SH: gl.constexpr = q_desc.layout
    q_lat = gl.allocate_shared_memory(gl.bfloat16, [64, 512], SH)
    q_rope = gl.allocate_shared_memory(gl.bfloat16, [64, 64], SH)
    k_lat = gl.allocate_shared_memory(gl.bfloat16, [128, 512], SH)
    k_rope = gl.allocate_shared_memory(gl.bfloat16, [128, 64], SH)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    mbarrier.expect(bar, (64 + 128) * DIM * 2)
    for c in gl.static_range(512 // 64):
        tma.async_copy_global_to_shared(q_desc, [0, c * 64], bar, q_lat.slice(c * 64, 64, dim=1))
        tma.async_copy_global_to_shared(k_desc, [0, c * 64], bar, k_lat.slice(c * 64, 64, dim=1))
    tma.async_copy_global_to_shared(q_desc, [0, 512], bar, q_rope)
    tma.async_copy_global_to_shared(k_desc, [0, 512], bar, k_rope)
    mbarrier.wait(bar, 0)
    sink = Sink + gl.program_id(0) * 2
    gl.warp_specialize([(_part, (q_lat, q_rope, k_lat, k_rope, iters, sink, 0, MODE)),
                        (_part, (q_lat, q_rope, k_lat, k_rope, iters, sink, 1, MODE))], [4], [240])


# product: (mode, FLOP a repeat in one warpgroup, warpgroups at work)
MODES = {"qk64": (0, 64 * 64 * 576 * 2, 2), "qk128": (1, 64 * 128 * 576 * 2, 2), "pv": (2, 64 * 256 * 64 * 2, 2),
         "qk64, one warpgroup": (3, 64 * 64 * 576 * 2, 1), "pv, one warpgroup": (4, 64 * 256 * 64 * 2, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    src = torch.randn(128, DIM.value, device="cuda", dtype=torch.bfloat16) * 0.01
    q_desc = TensorDescriptor.from_tensor(src[:64], [64, 64], layout)
    k_desc = TensorDescriptor.from_tensor(src, [128, 64], layout)
    sink = torch.zeros(sms * 2, device="cuda")

    rows = []
    for name, (mode, flop, groups) in MODES.items():
        ms = _time_ms(lambda mode=mode: rate_kernel[(sms,)](q_desc, k_desc, a.iters, sink, MODE=mode, num_warps=4))
        rows.append({"product": name, "tflops": sms * groups * a.iters * flop / ms / 1e9, "ms": ms})
    rows.append({"product": "torch.matmul 8192^3", "tflops": matmul_tflops(), "ms": None})
    print(f"{'product':<22}{'TFLOP/s':>10}{'ms':>10}")
    for r in rows:
        print(f"{r['product']:<22}{r['tflops']:>10.1f}{'' if r['ms'] is None else format(r['ms'], '.3f'):>10}")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "sms": sms, "iters": a.iters,
                                           "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
