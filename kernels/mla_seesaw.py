"""MLA decode for Hopper in Gluon: two warpgroups share one 64-head output in a seesaw schedule.

At 128 heads a byte of the latent cache carries about 240 FLOP, the H100's balance point, so the
Triton kernel (`mla_decode._mla_decode_stage1`) is bound by how well it keeps the tensor cores
busy: with `tl.dot` both warpgroups compute the whole score tile and the softmax sits between
the products. This kernel follows the schedule FlashMLA describes for its Hopper kernel ("seesaw"):
the (64 heads, 512) fp32 output is split in column halves, O_L in warpgroup 0 and O_R in
warpgroup 1 (128 registers a thread each), and the context is walked in pairs of 64-token tiles,
K0 (even) and K1 (odd). Per pair, with m the running max shared by both warpgroups (written here
as a plain max; the kernel's is lazy, below):

  WG0: S0 = q K0^T   m0 = max(m, rowmax S0)    P0 = exp2(S0 - m0) (to shared, with m0)
                     O_L = O_L a0 + P0 V0_L    then, given P1 and m1:  O_L = O_L a1 + P1 V1_L
  WG1: S1 = q K1^T   given P0 and m0:  O_R = O_R a0 + P0 V0_R   while computing
                     m1 = max(m0, rowmax S1)   P1 = exp2(S1 - m1) (to shared, with m1)
                     then O_R = O_R a1 + P1 V1_R

with a0 = exp2(m - m0), a1 = exp2(m0 - m1); FlashMLA's authors write the same sums in another
order. One warpgroup's softmax overlaps the other's products, so the tensor cores rarely wait on
the exponentials. The row sums are kept in two parts (WG0: the P0 terms, WG1: the P1 terms),
scaled alike and added at the end.

The max is lazy: a row's m is raised only where a tile's max passes it by more than LAZY (8, in
log2 units), so P stays at most 2^8, and each warpgroup votes (a warp reduction over m read back
from shared memory, where every warp sees all 64 rows) to skip the rescale of its output half when
no row moved. On random scores that is every pair past the first; real attention may raise the max
more often, and then pays the rescale as before. The 128 multiplies a thread it saves sit between
two products on the same accumulator: with the rescales left out altogether (wrong results, a
timing bound) the kernel ran 4-11% faster at 128 heads; the lazy max gained 1.5-4% in 11 of 12
A/B pairs on the H100 (1% slower in one; docs/performance.md, session 20).

Shared memory (bf16, 128-byte swizzle): q (64 x 576, 72 KiB) and two tile buffers K0, K1
(64 x 576 each): 216 KiB. P0 and P1 live in the rope columns of their own tile (64 x 64, the
same shape and layout), which are dead once that tile's scores are computed. Tiles come by TMA
in halves: the latent's left half (columns 0-255), and its right half with the rope columns.
Each half is reloaded by the warpgroup that reads it last, as soon as its last product is done:

  K0 left          WG0 after O_L += P0 V0_L     (WG1 never reads it)
  K0 right + rope  WG1 after O_R += P0 V0_R     (P0 sits in K0's rope columns)
  K1 right         WG1 after O_R += P1 V1_R     (WG0 never reads it)
  K1 left + rope   WG0 after O_L += P1 V1_L     (P1 sits in K1's rope columns)

and the next pair's score products start with the half that was reloaded first. A half arrives
as copies of CHUNK columns (and the rope columns), each on its own barrier, and the score product
takes each chunk as soon as it has landed. 128 columns measured up to 2.4% faster than whole
halves, 64 columns slower (every copy costs the warpgroup a barrier; docs/performance.md).

At 128 heads on the H100 this kernel, like FlashMLA, runs at the 700 W power cap (SM clock about
1.4 GHz with the cache in DRAM, 1.74 GHz with no loads): its time is its energy over 700 W, and
fewer cycles help only where they save energy (docs/performance.md, session 22).

Cache rows past a sequence's length inside its last page may hold anything (the engine's
contract): the warpgroup that scores the last, partial tile zeroes those rows of the latent in
shared memory before use, and masks their scores.

Scope (`supported`): sm_90, bf16 / fp16, 512 + 64 wide rows, heads a multiple of 64, pages a
multiple of 64 tokens, a contiguous cache and 16-byte aligned q (copied when not contiguous).
The launcher (`mla_decode.mla_decode`) takes the Triton kernel otherwise. The work list (which
program reads which tokens of which sequence, `mla_schedule`) and the stage-2 merge are shared
with the Triton kernel: this one writes the same outputs, normalized partials and log2-sum-exps.
"""

from __future__ import annotations

import os
import warnings

import torch

from moecluster.kernels.device import cuda_capability

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # no Triton, or a Triton without Gluon: the launcher uses the Triton kernel
    gluon = None

KV_LORA = 512
ROPE = 64
HEADS = 64  # heads per program: wgmma's M
TILE = 64  # tokens per tile
_WG1_REGS = 256  # warpgroup 1's registers a thread: 8 warps x 256 fill the register file
LAZY = 8.0  # log2 units a row's scores may pass its reference max before the max is raised (P <= 2^LAZY)
CHUNK = 128  # latent columns a TMA copy (and its barrier) covers: the score product starts on each as it lands
_CHUNKS = KV_LORA // CHUNK  # a tile's latent chunks; its rope columns have one more barrier
# Barriers, one arrival each: q landed; each tile's latent chunks and rope columns landed (tile t's
# chunk c is _BAR_K + t * (_CHUNKS + 1) + c, its rope c = _CHUNKS); m0 and P0 published, m1 and P1
# published, the two row-sum parts.
_BAR_Q = 0
_BAR_K = 1
_BAR_M0, _BAR_P1, _BAR_L1, _BAR_L = range(_BAR_K + 2 * (_CHUNKS + 1), _BAR_K + 2 * (_CHUNKS + 1) + 4)
_NUM_BARS = _BAR_L + 1


def _kbar(t: int, c: int) -> int:
    """The barrier of tile buffer t's latent chunk c (c = _CHUNKS: its rope columns)."""
    return _BAR_K + t * (_CHUNKS + 1) + c


_failed: list[str] = []  # the first launch error, after which the Triton kernel takes every call


def enabled() -> bool:
    """MOECLUSTER_MLA_SEESAW=0 turns the kernel off (the Triton kernel runs instead), as does a failed launch."""
    return gluon is not None and not _failed and os.environ.get("MOECLUSTER_MLA_SEESAW", "1") != "0"


def supported(q: torch.Tensor, kv_cache: torch.Tensor, kv_lora_rank: int) -> bool:
    """Whether this kernel takes the call (see the module docstring's scope)."""
    if not (enabled() and q.is_cuda and kv_cache.is_cuda) or torch.version.hip is not None:
        return False
    if cuda_capability(q.device) != (9, 0):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or kv_cache.dtype != q.dtype:
        return False
    if kv_lora_rank != KV_LORA or q.shape[-1] != KV_LORA + ROPE or q.shape[1] % HEADS:
        return False
    if kv_cache.shape[1] % TILE:
        return False
    rows_contiguous = kv_cache.stride(2) == 1 and kv_cache.stride(1) == kv_cache.shape[2]
    rows_contiguous &= kv_cache.stride(0) == kv_cache.shape[1] * kv_cache.shape[2]
    aligned = kv_cache.data_ptr() % 16 == 0 and (q.data_ptr() % 16 == 0 or not q.is_contiguous())
    return rows_contiguous and aligned


if gluon is not None:

    _C_KV_LORA = gl.constexpr(KV_LORA)
    _C_ROPE = gl.constexpr(ROPE)
    _C_HEADS = gl.constexpr(HEADS)
    _C_TILE = gl.constexpr(TILE)
    _C_BAR_Q = gl.constexpr(_BAR_Q)
    _C_CHUNK = gl.constexpr(CHUNK)
    _C_CHUNKS = gl.constexpr(_CHUNKS)
    _C_HALF_CHUNKS = gl.constexpr(_CHUNKS // 2)
    _kbar_c = gluon.constexpr_function(_kbar)
    _C_BAR_M0 = gl.constexpr(_BAR_M0)
    _C_BAR_P1 = gl.constexpr(_BAR_P1)
    _C_BAR_L1 = gl.constexpr(_BAR_L1)
    _C_BAR_L = gl.constexpr(_BAR_L)
    _C_NUM_BARS = gl.constexpr(_NUM_BARS)
    _C_WG1_REGS = gl.constexpr(_WG1_REGS)
    _C_LAZY = gl.constexpr(LAZY)
    # Each warpgroup's layouts (4 warps): wgmma accumulators of the (64, 64) scores and of its (64, 256)
    # output half, P as the P.V product's register operand, and their rows.
    _MMA_S = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, TILE, 16]))
    _MMA_O = gl.constexpr(gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16]))
    _P_OP = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=_MMA_O.value, k_width=2))
    _ROW_S = gl.constexpr(gl.SliceLayout(1, _MMA_S.value))
    _ROW_O = gl.constexpr(gl.SliceLayout(1, _MMA_O.value))
    _REP = gl.constexpr(gl.BlockedLayout([_C_HEADS // 32], [32], [4], [0]))  # a row vector whole in each warp

    @gluon.jit
    def _load_half(kv_desc, rope_desc, bt_row, stride_btn, tok, k_lat, k_rope, bars, T: gl.constexpr, HALF: gl.constexpr,
                   WITH_ROPE: gl.constexpr, PAGE_SIZE: gl.constexpr):
        """TMA of one half of the tile starting at token `tok` (its page from the block table) into tile
        buffer T's columns HALF * 256 ..., a copy per chunk of CHUNK columns, each on its own barrier,
        and its rope columns into k_rope when WITH_ROPE."""
        page = gl.load(bt_row + (tok // PAGE_SIZE) * stride_btn).to(gl.int32)
        row = page * PAGE_SIZE + tok % PAGE_SIZE
        for c in gl.static_range(HALF * _C_HALF_CHUNKS, (HALF + 1) * _C_HALF_CHUNKS):
            bar = bars[_kbar_c(T, c)]
            mbarrier.expect(bar, _C_TILE * _C_CHUNK * 2)
            tma.async_copy_global_to_shared(kv_desc, [row, c * _C_CHUNK], bar, k_lat.slice(c * _C_CHUNK, _C_CHUNK, dim=1))
        if WITH_ROPE:
            bar = bars[_kbar_c(T, _C_CHUNKS)]
            mbarrier.expect(bar, _C_TILE * _C_ROPE * 2)
            tma.async_copy_global_to_shared(rope_desc, [row, _C_KV_LORA], bar, k_rope)

    @gluon.jit
    def _wait_half(bars, T: gl.constexpr, HALF: gl.constexpr, ph):
        """Wait until every chunk of tile buffer T's latent half HALF has landed."""
        for c in gl.static_range(HALF * _C_HALF_CHUNKS, (HALF + 1) * _C_HALF_CHUNKS):
            mbarrier.wait(bars[_kbar_c(T, c)], ph)

    @gluon.jit
    def _zero_tail_rows(k_lat, valid):
        """Zero the latent rows >= valid of a tile in shared memory (its last, partial tile), so that
        whatever the cache holds past the sequence cannot reach the products; then make the stores
        visible to the tensor cores of both warpgroups."""
        ZL: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        rows = gl.arange(0, _C_TILE, layout=gl.SliceLayout(1, ZL))
        for c in gl.static_range(_C_KV_LORA // 64):
            chunk = k_lat.slice(c * 64, 64, dim=1)
            vals = chunk.load(ZL)
            chunk.store(gl.where(rows[:, None] < valid, vals, gl.zeros_like(vals)))
        fence_async_shared()
        gl.thread_barrier()

    @gluon.jit
    def _score_half(q_lat, k_lat, bars, T: gl.constexpr, ph, HALF: gl.constexpr, s):
        """s += q . (latent half HALF of tile buffer T)^T, each chunk's product issued as soon as it has landed."""
        for c in gl.static_range(HALF * _C_HALF_CHUNKS, (HALF + 1) * _C_HALF_CHUNKS):
            mbarrier.wait(bars[_kbar_c(T, c)], ph)
            s = warpgroup_mma(q_lat.slice(c * _C_CHUNK, _C_CHUNK, dim=1),
                              k_lat.slice(c * _C_CHUNK, _C_CHUNK, dim=1).permute((1, 0)), s, is_async=True)
        return s

    @gluon.jit
    def _scores(q_lat, q_rope, k_lat, k_rope, bars, T: gl.constexpr, ph, FIRST: gl.constexpr, last_partial, valid):
        """q (64, 576) . tile^T -> (64 heads, 64 tokens) fp32, a product per chunk as soon as it has landed:
        the latent half FIRST, then the other half, then the rope columns. A partial last tile
        (`last_partial`) has its dead rows zeroed first."""
        s = gl.zeros([_C_HEADS, _C_TILE], gl.float32, _MMA_S)
        rope_bar = bars[_kbar_c(T, _C_CHUNKS)]
        if last_partial:
            _wait_half(bars, T, 0, ph)
            _wait_half(bars, T, 1, ph)
            mbarrier.wait(rope_bar, ph)
            _zero_tail_rows(k_lat, valid)
        s = _score_half(q_lat, k_lat, bars, T, ph, FIRST, s)
        s = _score_half(q_lat, k_lat, bars, T, ph, 1 - FIRST, s)
        mbarrier.wait(rope_bar, ph)
        s = warpgroup_mma(q_rope, k_rope.permute((1, 0)), s, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=[s])

    @gluon.jit
    def _raise_max(m, tile_max):
        """The reference max after a tile: a row's is raised to the tile's max only where that passes it
        by more than LAZY, so most tiles leave it (and the output) as it is; P = exp2(s - m) stays at
        most 2^LAZY, harmless in bf16 / fp16 and in the fp32 sums. Every row is raised on the first
        tile (m = -inf)."""
        return gl.where(tile_max > m + _C_LAZY, tile_max, m)

    @gluon.jit
    def _raised(m_pub, m_old):
        """(the max published in m_pub as every warp holds it whole, whether it differs from m_old in any
        row): read back from shared memory, so that the warpgroup's vote is a reduction inside each
        warp (a reduction across the warps compiled to 37 more spill loads a pair in each warpgroup)."""
        m_new = m_pub.load(_REP)
        return m_new, gl.max((m_new != m_old).to(gl.int32), axis=0) > 0

    @gluon.jit
    def _rescale(o, a, raised):
        """o * a by rows, skipped by the whole warpgroup when no row's max was raised (every factor 1):
        128 multiplies a thread, after the last product on o."""
        if raised:
            o = o * gl.convert_layout(a, _ROW_O)[:, None]
        return o

    @gluon.jit
    def _store_half(o, l_tot, direct, Out, out_off, stride_oh, stride_od, Partial, p_off, stride_ph, stride_pd,
                    out_desc, row_out, buf, HALF: gl.constexpr, out_tma):
        """This warpgroup's (64, 256) output columns, normalized by the row sums (zeros for an empty
        sequence), into the output (a sequence of one unit) or the unit's fp32 partial. With out_tma
        the output goes through shared memory and TMA: `buf` is the tile buffer whose columns
        HALF * 256 ... only this warpgroup reads (K0's left half, K1's right half), dead by now:
        both warpgroups have passed the row-sum exchange (so both loops and their products are
        done), and no tile is loaded past the unit's last (a prefetch beyond it would break this)."""
        l_o = gl.convert_layout(l_tot, _ROW_O)
        o = o / gl.where(l_o > 0.0, l_o, 1.0)[:, None]
        heads = gl.arange(0, _C_HEADS, layout=_ROW_O).to(gl.int64)
        cols = HALF * 256 + gl.arange(0, 256, layout=gl.SliceLayout(0, _MMA_O))
        if direct:
            if out_tma:
                buf.slice(HALF * 256, 256, dim=1).store(o.to(buf.dtype))
                fence_async_shared()
                gl.thread_barrier()
                for c in gl.static_range(256 // _C_CHUNK):  # (a local of the column is not a constexpr)
                    tma.async_copy_shared_to_global(out_desc, [row_out, HALF * 256 + c * _C_CHUNK],
                                                    buf.slice(HALF * 256 + c * _C_CHUNK, _C_CHUNK, dim=1))
                tma.store_wait(0)
            else:
                gl.store(Out + out_off + heads[:, None] * stride_oh + cols[None, :] * stride_od, o.to(Out.dtype.element_ty))
        else:
            gl.store(Partial + p_off + heads[:, None] * stride_ph + cols[None, :] * stride_pd, o)

    @gluon.jit
    def _wg0(q_lat, q_rope, k_lat, k_rope, m_buf, l_buf, bars, kv_desc, rope_desc, bt_row, stride_btn, start, n_tiles, last_valid,
             sm_scale_log2, direct, Out, out_off, stride_oh, stride_od, Partial, p_off, stride_ph, stride_pd,
             out_desc, row_out, Lse, lse_off, stride_lh, PAGE_SIZE: gl.constexpr, out_tma):
        """Warpgroup 0: the even tiles' scores and softmax, O_L; publishes m0 and P0."""
        dtype: gl.constexpr = q_lat.dtype
        cols = gl.arange(0, _C_TILE, layout=gl.SliceLayout(0, _MMA_S))

        m_i = gl.full([_C_HEADS], float("-inf"), gl.float32, _ROW_S)
        m_rep = gl.full([_C_HEADS], float("-inf"), gl.float32, _REP)  # m_i as each warp holds it whole
        l_i = gl.zeros([_C_HEADS], gl.float32, _ROW_S)
        o = gl.zeros([_C_HEADS, 256], gl.float32, _MMA_O)
        if n_tiles > 0:  # no q is loaded for an empty unit (a sequence of length 0)
            mbarrier.wait(bars[_C_BAR_Q], 0)
        for pair in range(gl.cdiv(n_tiles, 2)):
            ph = pair & 1
            t0 = 2 * pair
            has1 = t0 + 1 < n_tiles
            part0 = (t0 == n_tiles - 1) & (last_valid < _C_TILE)
            s = _scores(q_lat, q_rope, k_lat.index(0), k_rope.index(0), bars, 0, ph, 0, part0, last_valid)
            s = s * sm_scale_log2
            if part0:
                s = gl.where(cols[None, :] < last_valid, s, float("-inf"))
            m0 = _raise_max(m_i, gl.max(s, axis=1))  # finite: the tile holds a valid token
            a0 = gl.exp2(m_i - m0)  # 0 on the first tile, 1 where the max stays
            p0 = gl.exp2(s - m0[:, None]).to(dtype)
            l_i = l_i * a0 + gl.sum(p0.to(gl.float32), axis=1)
            k_rope.index(0).store(p0)  # P0 in K0's rope columns (dead once S0 is done), for WG1
            m_buf.index(0).store(m0)
            fence_async_shared()
            mbarrier.arrive(bars[_C_BAR_M0])

            m0_rep, raised0 = _raised(m_buf.index(0), m_rep)
            o = _rescale(o, a0, raised0)
            p0_op = gl.convert_layout(p0, _P_OP)
            o = warpgroup_mma(p0_op, k_lat.index(0).slice(0, 256, dim=1), o, is_async=True)
            o, p0_op = warpgroup_mma_wait(num_outstanding=0, deps=[o, p0_op])
            if t0 + 2 < n_tiles:  # K0's left half is dead: the next even tile's, before waiting for P1
                _load_half(kv_desc, rope_desc, bt_row, stride_btn, start + (t0 + 2) * _C_TILE, k_lat.index(0), k_rope.index(0),
                           bars, 0, 0, False, PAGE_SIZE)
            m1 = m0
            m_rep = m0_rep
            if has1:
                mbarrier.wait(bars[_C_BAR_P1], ph)
                m1 = m_buf.index(1).load(_ROW_S)
                a1 = gl.exp2(m0 - m1)
                l_i = l_i * a1
                m_rep, raised1 = _raised(m_buf.index(1), m0_rep)
                o = _rescale(o, a1, raised1)
                _wait_half(bars, 1, 0, ph)  # as WG1 does for K0's right half: already complete
                o = warpgroup_mma(k_rope.index(1), k_lat.index(1).slice(0, 256, dim=1), o, is_async=True)
                o = warpgroup_mma_wait(num_outstanding=0, deps=[o])
                if t0 + 3 < n_tiles:  # K1's left half and P1 are dead: the next odd tile's
                    _load_half(kv_desc, rope_desc, bt_row, stride_btn, start + (t0 + 3) * _C_TILE, k_lat.index(1), k_rope.index(1),
                               bars, 1, 0, True, PAGE_SIZE)
            m_i = m1

        mbarrier.wait(bars[_C_BAR_L1], 0)
        l_tot = l_i + l_buf.index(1).load(_ROW_S)
        l_buf.index(0).store(l_tot)
        mbarrier.arrive(bars[_C_BAR_L])
        _store_half(o, l_tot, direct, Out, out_off, stride_oh, stride_od, Partial, p_off, stride_ph, stride_pd,
                    out_desc, row_out, k_lat.index(0), 0, out_tma)
        if ~direct:  # a unit of a sequence cut in several: its log2-sum-exp for stage 2
            nonempty = l_tot > 0.0
            lse = gl.where(nonempty, m_i + gl.log2(gl.where(nonempty, l_tot, 1.0)), float("-inf"))
            heads = gl.arange(0, _C_HEADS, layout=_ROW_S)
            gl.store(Lse + lse_off + heads * stride_lh, lse)

    @gluon.jit
    def _wg1(q_lat, q_rope, k_lat, k_rope, m_buf, l_buf, bars, kv_desc, rope_desc, bt_row, stride_btn, start, n_tiles, last_valid,
             sm_scale_log2, direct, Out, out_off, stride_oh, stride_od, Partial, p_off, stride_ph, stride_pd,
             out_desc, row_out, PAGE_SIZE: gl.constexpr, out_tma):
        """Warpgroup 1: the odd tiles' scores and softmax, O_R; publishes m1 and P1."""
        dtype: gl.constexpr = q_lat.dtype
        cols = gl.arange(0, _C_TILE, layout=gl.SliceLayout(0, _MMA_S))

        m_i = gl.full([_C_HEADS], float("-inf"), gl.float32, _ROW_S)
        m_rep = gl.full([_C_HEADS], float("-inf"), gl.float32, _REP)  # m_i as each warp holds it whole
        l_i = gl.zeros([_C_HEADS], gl.float32, _ROW_S)
        o = gl.zeros([_C_HEADS, 256], gl.float32, _MMA_O)
        if n_tiles > 0:  # no q is loaded for an empty unit (a sequence of length 0)
            mbarrier.wait(bars[_C_BAR_Q], 0)
        for pair in range(gl.cdiv(n_tiles, 2)):
            ph = pair & 1
            t1 = 2 * pair + 1
            has1 = t1 < n_tiles
            s = gl.zeros([_C_HEADS, _C_TILE], gl.float32, _MMA_S)
            part1 = (t1 == n_tiles - 1) & (last_valid < _C_TILE)
            if has1:
                s = _scores(q_lat, q_rope, k_lat.index(1), k_rope.index(1), bars, 1, ph, 1, part1, last_valid)
            mbarrier.wait(bars[_C_BAR_M0], ph)
            m0 = m_buf.index(0).load(_ROW_S)
            a0 = gl.exp2(m_i - m0)
            l_i = l_i * a0
            m0_rep, raised0 = _raised(m_buf.index(0), m_rep)
            o = _rescale(o, a0, raised0)
            # K0's right half landed for WG0 (whose M0 this follows); waited here too, so that WG1's own
            # view of the TMA's writes does not rest on the ordering through WG0 alone. Already complete.
            _wait_half(bars, 0, 1, ph)
            o = warpgroup_mma(k_rope.index(0), k_lat.index(0).slice(256, 256, dim=1), o, is_async=True)  # P0 V0_R
            if has1:
                s = s * sm_scale_log2
                if part1:
                    s = gl.where(cols[None, :] < last_valid, s, float("-inf"))
            m1 = m0
            p1 = gl.zeros([_C_HEADS, _C_TILE], dtype, _MMA_S)
            if has1:  # the softmax overlaps P0 V0_R
                m1 = _raise_max(m0, gl.max(s, axis=1))
                p1 = gl.exp2(s - m1[:, None]).to(dtype)
                k_rope.index(1).store(p1)  # P1 in K1's rope columns, for WG0
                m_buf.index(1).store(m1)
                fence_async_shared()
                mbarrier.arrive(bars[_C_BAR_P1])
            o = warpgroup_mma_wait(num_outstanding=0, deps=[o])
            if t1 + 1 < n_tiles:  # K0's right half and P0 are dead: the next even tile's
                _load_half(kv_desc, rope_desc, bt_row, stride_btn, start + (t1 + 1) * _C_TILE, k_lat.index(0), k_rope.index(0),
                           bars, 0, 1, True, PAGE_SIZE)
            m_rep = m0_rep
            if has1:
                a1 = gl.exp2(m0 - m1)
                l_i = l_i * a1 + gl.sum(p1.to(gl.float32), axis=1)
                m_rep, raised1 = _raised(m_buf.index(1), m0_rep)
                o = _rescale(o, a1, raised1)
                p1_op = gl.convert_layout(p1, _P_OP)
                o = warpgroup_mma(p1_op, k_lat.index(1).slice(256, 256, dim=1), o, is_async=True)
                o, p1_op = warpgroup_mma_wait(num_outstanding=0, deps=[o, p1_op])
                if t1 + 2 < n_tiles:  # K1's right half is dead: the next odd tile's
                    _load_half(kv_desc, rope_desc, bt_row, stride_btn, start + (t1 + 2) * _C_TILE, k_lat.index(1), k_rope.index(1),
                               bars, 1, 1, False, PAGE_SIZE)
            m_i = m1

        l_buf.index(1).store(l_i)
        mbarrier.arrive(bars[_C_BAR_L1])
        mbarrier.wait(bars[_C_BAR_L], 0)
        l_tot = l_buf.index(0).load(_ROW_S)
        _store_half(o, l_tot, direct, Out, out_off, stride_oh, stride_od, Partial, p_off, stride_ph, stride_pd,
                    out_desc, row_out, k_lat.index(1), 1, out_tma)

    @gluon.jit(do_not_specialize=("stride_btb", "stride_outb", "out_tma"))
    def mla_seesaw_kernel(
        q_desc,  # TMA over q as (batch * heads, 576), boxes of 64 x 256
        q_rope_desc,  # the same, boxes of 64 x 64
        kv_desc,  # TMA over the cache as (blocks * page_size, 576), boxes of 64 x CHUNK (latent chunks)
        rope_desc,  # the same, boxes of 64 x 64 (the rope columns)
        out_desc,  # TMA over the output as (batch * heads, 512), boxes of 64 x CHUNK (out_tma only)
        BlockTables,  # (batch, max_blocks) int32 / int64
        Out,  # (batch, heads, 512): written here for a sequence of one unit
        Partial,  # (capacity, heads, 512) fp32: a unit's normalized partial, sequences of several units
        Lse,  # (capacity, heads) fp32: a unit's log2-sum-exp, same
        Units,  # (capacity, 4) int32: (sequence, first token, end token, partial slot), from mla_schedule
        SeqPlan,  # (batch, 2) int32: (first unit, unit count)
        NumUnits,  # (1,) int32
        sm_scale_log2,
        num_heads,
        stride_btb,
        stride_btn,
        stride_outb,
        stride_outh,
        stride_outd,
        stride_pu,
        stride_ph,
        stride_pd,
        stride_lu,
        stride_lh,
        PAGE_SIZE: gl.constexpr,
        out_tma,  # 1: the output is stored by TMA (contiguous, 16-byte aligned). A run-time flag: as a
        # constexpr, the variant without plain stores compiled to 29 spill loads a pair in warpgroup 0's
        # loop against 16 (ptxas's allocation moved), and ran 4-6% slower at 32K tokens.
    ):
        pid_h = gl.program_id(0)  # fastest: the head blocks of one unit read the same tiles
        u = gl.program_id(1)
        n_units = gl.load(NumUnits)
        if u >= n_units:  # the grid holds `capacity` units; the plan used fewer
            return
        b = gl.load(Units + u * 4)
        start = gl.load(Units + u * 4 + 1)
        end = gl.load(Units + u * 4 + 2)
        slot = gl.load(Units + u * 4 + 3)  # its partial's row
        direct = gl.load(SeqPlan + b * 2 + 1) == 1  # the sequence's only unit
        n_tok = gl.maximum(end - start, 0)
        n_tiles = gl.cdiv(n_tok, _C_TILE)
        last_valid = n_tok - (n_tiles - 1) * _C_TILE  # tokens in the last tile
        bt_row = BlockTables + b.to(gl.int64) * stride_btb
        out_off = b.to(gl.int64) * stride_outb + (pid_h * _C_HEADS).to(gl.int64) * stride_outh
        p_off = slot.to(gl.int64) * stride_pu + (pid_h * _C_HEADS).to(gl.int64) * stride_ph
        lse_off = slot.to(gl.int64) * stride_lu + pid_h * _C_HEADS * stride_lh
        row_q = b * num_heads + pid_h * _C_HEADS  # q's row in (batch * heads, 576), the output's in (.., 512)

        dtype: gl.constexpr = q_desc.dtype
        SH: gl.constexpr = q_desc.layout
        q_lat = gl.allocate_shared_memory(dtype, [_C_HEADS, _C_KV_LORA], SH)
        q_rope = gl.allocate_shared_memory(dtype, [_C_HEADS, _C_ROPE], SH)
        k_lat = gl.allocate_shared_memory(dtype, [2, _C_TILE, _C_KV_LORA], SH)
        k_rope = gl.allocate_shared_memory(dtype, [2, _C_TILE, _C_ROPE], SH)
        VEC: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        m_buf = gl.allocate_shared_memory(gl.float32, [2, _C_HEADS], VEC)
        l_buf = gl.allocate_shared_memory(gl.float32, [2, _C_HEADS], VEC)
        # One allocation per barrier: with all in one, the compiler's shared-memory hazard analysis saw
        # every wait conflict with any earlier expect and put a warpgroup barrier before each wait.
        bars = ()
        for i in gl.static_range(_C_NUM_BARS):
            bars = bars + (gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout()),)
            mbarrier.init(bars[i], count=1)

        if n_tiles > 0:
            mbarrier.expect(bars[_C_BAR_Q], _C_HEADS * (_C_KV_LORA + _C_ROPE) * 2)
            for h in gl.static_range(2):
                tma.async_copy_global_to_shared(q_desc, [row_q, h * 256], bars[_C_BAR_Q], q_lat.slice(h * 256, 256, dim=1))
            tma.async_copy_global_to_shared(q_rope_desc, [row_q, _C_KV_LORA], bars[_C_BAR_Q], q_rope)
            _load_half(kv_desc, rope_desc, bt_row, stride_btn, start, k_lat.index(0), k_rope.index(0), bars, 0, 0, False,
                       PAGE_SIZE)
            _load_half(kv_desc, rope_desc, bt_row, stride_btn, start, k_lat.index(0), k_rope.index(0), bars, 0, 1, True,
                       PAGE_SIZE)
        if n_tiles > 1:
            _load_half(kv_desc, rope_desc, bt_row, stride_btn, start + _C_TILE, k_lat.index(1), k_rope.index(1), bars, 1, 1,
                       False, PAGE_SIZE)
            _load_half(kv_desc, rope_desc, bt_row, stride_btn, start + _C_TILE, k_lat.index(1), k_rope.index(1), bars, 1, 0,
                       True, PAGE_SIZE)

        gl.warp_specialize([
            (_wg0, (q_lat, q_rope, k_lat, k_rope, m_buf, l_buf, bars, kv_desc, rope_desc, bt_row, stride_btn, start, n_tiles,
                    last_valid, sm_scale_log2, direct, Out, out_off, stride_outh, stride_outd, Partial, p_off, stride_ph, stride_pd,
                    out_desc, row_q, Lse, lse_off, stride_lh, PAGE_SIZE, out_tma)),
            (_wg1, (q_lat, q_rope, k_lat, k_rope, m_buf, l_buf, bars, kv_desc, rope_desc, bt_row, stride_btn, start, n_tiles,
                    last_valid, sm_scale_log2, direct, Out, out_off, stride_outh, stride_outd, Partial, p_off, stride_ph, stride_pd,
                    out_desc, row_q, PAGE_SIZE, out_tma)),
        ], [4], [_C_WG1_REGS])


def try_launch_stage1(*args) -> bool:
    """`launch_stage1`; False (with one warning, and the kernel off for the process) if it fails to
    compile or launch, so that the caller runs the Triton kernel instead."""
    try:
        launch_stage1(*args)
    except torch.cuda.OutOfMemoryError:
        raise  # not the kernel's fault: the caller sees it, the kernel stays on
    except Exception as exc:  # noqa: BLE001 - any compiler or driver error: fall back, say why once
        _failed.append(f"{type(exc).__name__}: {exc}")
        warnings.warn(f"the Gluon MLA decode kernel failed ({_failed[0]}); using the Triton kernel", stacklevel=3)
        return False
    return True


def launch_stage1(q, kv_cache, block_tables, out, partial, lse, plan, capacity, scale_log2) -> None:
    """Stage 1 of `mla_decode` on this kernel over the units of `plan` (units, seq_plan, num_units;
    `mla_schedule`): the output of each sequence of one unit, the partials of the others' units.
    q (batch, heads, 576) is made contiguous if it is not."""
    batch, num_heads, dim = q.shape
    q2 = q.contiguous().view(batch * num_heads, dim)
    kv2 = kv_cache.view(kv_cache.shape[0] * kv_cache.shape[1], dim)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    q_desc = TensorDescriptor.from_tensor(q2, [HEADS, 256], layout)
    q_rope_desc = TensorDescriptor.from_tensor(q2, [HEADS, ROPE], layout)
    kv_desc = TensorDescriptor.from_tensor(kv2, [TILE, CHUNK], layout)
    rope_desc = TensorDescriptor.from_tensor(kv2, [TILE, ROPE], layout)
    # The output by TMA where it is one contiguous (batch * heads, 512) matrix (the kernel's own tile
    # buffers stage it); a strided view takes plain stores. Stage 1 alone on the H100, 64 sequences x
    # 128 heads: 11.8 / 45.4 / 146.6 us at 128 / 1K / 4K tokens against 27.3 / 61.5 / 158.3 with plain
    # stores; at 32K the two are within 4% either way, run to run (scripts/time_mla_output_store.py).
    out_tma = out.is_contiguous() and out.data_ptr() % 16 == 0
    # (unused without out_tma: kv_desc stands in, whose box is the same 64 x CHUNK, so one compiled kernel serves both)
    out_desc = TensorDescriptor.from_tensor(out.view(batch * num_heads, KV_LORA), [HEADS, CHUNK], layout) if out_tma else kv_desc
    grid = (num_heads // HEADS, capacity)
    mla_seesaw_kernel[grid](
        q_desc, q_rope_desc, kv_desc, rope_desc, out_desc, block_tables, out, partial, lse, *plan, scale_log2, num_heads,
        *block_tables.stride(), *out.stride(), *partial.stride(), *lse.stride(),
        PAGE_SIZE=kv_cache.shape[1], out_tma=int(out_tma), num_warps=4,
    )  # fmt: skip
