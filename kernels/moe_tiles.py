"""Tile sizes and launch options of the fused MoE GEMM kernel (kernels/fused_moe.py): the
`TileConfig` a launch takes and the defaults per weight format and batch size, from sweeps on an
H100 (`scripts/tune_fused_moe.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from moecluster.kernels.moe_weights import ExpertWeights, Int4Experts


@dataclass(frozen=True)
class TileConfig:
    """Tiles and launch options of one kernel (gate_up or down); each kernel maps its own row blocks.

    block_m / block_n: powers of two >= 16. block_k: dense, a power of two >= 16; INT4, a multiple
    of the repack's k_block that divides the padded K (the kernel steps over whole packed blocks),
    None meaning k_block."""

    block_m: int
    block_n: int
    block_k: int | None
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 0  # launch order (module docstring): 0 = m-blocks fastest, else groups of group_m
    int4_stack: int = 1  # INT4: unpacked sub-tiles (k_block / 8 inputs each) per dot: 1, 2, 4 or 8
    int4_ptx: bool = True  # INT4, 16-bit activations on sm_90+: dequantize weight pairs with inline PTX
    split_k: int = 0  # fp8_linear only: programs along K (fp32 partials, added after); 0 = `linear_split_k`


def default_tiles(
    rows: int, weights: ExpertWeights, dtype: torch.dtype = torch.bfloat16, *, fp8_activations: bool = False
) -> tuple[TileConfig, TileConfig]:
    """(gate_up tiles, down tiles) for `rows` grouped rows, from the mean rows per expert.

    Picked from a small sweep on one H100 (Triton 3.6, H=7168, I=2048, 32 local experts, bf16,
    equal counts): decode (<= 16 rows per expert) is weight-bandwidth bound, BLOCK_M 16 wastes no
    MMA rows and BLOCK_N 64 gives enough programs for 132 SMs; prefill is MMA bound and takes
    larger tiles. fp32 activations (tests, not a serving path) get a shallower K and fewer stages
    to fit shared memory. Worth re-tuning per GPU, expert count and skew.
    """
    mean = rows / max(weights.num_experts, 1)
    if fp8_activations:  # W8A8: one e4m3 dot per 128-deep scale block (half the bytes of a bf16 tile)
        return w8a8_tiles(mean)
    if isinstance(weights, Int4Experts):
        gu, dn = _int4_tiles(mean, weights)
    elif mean <= 16:
        gu, dn = TileConfig(16, 64, 128, 4, 4), TileConfig(16, 64, 128, 4, 4)
    elif mean <= 32:
        gu, dn = TileConfig(32, 64, 128, 4, 4), TileConfig(32, 64, 128, 4, 4)
    elif mean <= 128:
        gu, dn = TileConfig(64, 128, 64, 8, 3), TileConfig(64, 256, 64, 8, 3)
    elif mean <= 1024:  # group_m: H100 sweep (scripts/tune_fused_moe.py), 4 to 16 within noise
        gu, dn = TileConfig(64, 256, 64, 8, 3, 4), TileConfig(128, 256, 64, 8, 3, 4)
    else:
        gu, dn = TileConfig(128, 128, 64, 8, 4, 4), TileConfig(128, 256, 64, 8, 3, 4)
    if dtype == torch.float32:
        gu, dn = (fp32_tiles(t, isinstance(weights, Int4Experts)) for t in (gu, dn))
    return gu, dn


def _int4_tiles(mean: float, weights: Int4Experts) -> tuple[TileConfig, TileConfig]:
    """INT4 tiles by mean rows per expert. H100 sweep (scripts/tune_fused_moe.py and per-kernel
    timings, docs/performance.md): the repack's sub-tiles of 32 inputs (k_block 256, one scale
    group each) halve the loads and dots per input of k_block 128's 16 and were 8% faster at 8
    rows per expert, 19% at 32; above 32 rows (measured at 64), 4 sub-tiles stacked into one
    128-deep dot (at 32 rows stacking was 1.9x slower; 33-63 rows not measured)."""
    kb = weights.gate.k_block
    wide = kb >= 256  # sub-tiles of 32 inputs; k_block 128's are 16
    stages = 2 if wide else 3
    if mean <= 16:  # k_block 128: two packed blocks per K step where both K's allow it
        two = not wide and all((w.packed.shape[1] * 8) % (2 * kb) == 0 for w in (weights.gate, weights.down))
        t = TileConfig(16, 64, 2 * kb if two else kb, 4, 2)
    elif mean <= 32:
        t = TileConfig(32, 64, kb, 4, 2)
    elif mean <= 128:
        t = TileConfig(64, 64, kb, 4, stages, int4_stack=4)
    else:
        t = TileConfig(128, 128, kb, 8, stages, 8, int4_stack=4 if wide else 8)
    return t, t  # the same tiles for gate_up and down


def w8a8_tiles(mean_rows: float) -> tuple[TileConfig, TileConfig]:
    """(gate_up, down) tiles of the W8A8 mode by mean rows per expert (or rows of a linear).

    Decode sizes (the decode graphs' routed experts, `decode_experts_w8a8`): 16-row tiles of 64
    columns, 4 warps, 4 stages. Sweep on an H200 (scripts/time_decode_gemms.py --experts-w8a8,
    DeepSeek-V3's experts at 2-4 mean rows each): all 256 experts at 64 tokens 2.77 -> 2.39 ms
    (roofline 2.33), an EP=2 rank's share 1.33 -> 1.15 (1.11), 128 tokens 3.12 -> 2.79 (2.60),
    against the 64-row tiles below; 5-16 mean rows were not measured."""
    if mean_rows <= 16:
        return TileConfig(16, 64, 128, 4, 4), TileConfig(16, 64, 128, 4, 4)
    if mean_rows <= 128:
        return TileConfig(64, 128, 128, 8, 3), TileConfig(64, 256, 128, 8, 3)
    # 128-row tiles were 2.4x slower (H100 sweep: the fp32 partial product beside the accumulator)
    return TileConfig(64, 128, 128, 8, 3, 16), TileConfig(64, 256, 128, 8, 3, 16)


def fp32_tiles(t: TileConfig, int4: bool) -> TileConfig:
    block_k = t.block_k if int4 or t.block_k is None else min(t.block_k, 32)
    return replace(t, block_n=min(t.block_n, 128), block_k=block_k, num_stages=min(t.num_stages, 2))


# fp8_linear, W8A16 (decode sizes): (most rows, tiles, split-K waves), first that fits. Sweep on an
# H100 (scripts/time_decode_gemms.py: DeepSeek-V3's eight FP8 linear shapes at 16 / 32 / 64 rows,
# replayed from CUDA graphs, weighted by launches per decode step): against the previous
# defaults (16 x 64 tiles to 16 rows, 64 x 128 x 64 above, no split), the step's sum of these
# GEMMs fell from 0.725 / 1.316 / 1.378 ms to 0.710 / 0.799 / 1.219 ms.
# Above 64 rows (not swept) the tiles stay those of before and K is not split.
_LINEAR = ((16, TileConfig(16, 32, 128, 4, 4), 4.0), (32, TileConfig(32, 64, 128, 4, 4), 8.0),
           (64, TileConfig(64, 128, 64, 8, 3), 2.0))
_LINEAR_LARGE = (TileConfig(64, 128, 64, 8, 3), 0.0)


def linear_tiles(rows: int) -> tuple[TileConfig, float]:
    """(tiles, split-K waves for `linear_split_k`; 0 = no split) of a W8A16 fp8_linear over `rows` rows."""
    return next(((t, w) for most, t, w in _LINEAR if rows <= most), _LINEAR_LARGE)


# fp8_linear, W8A8 at decode sizes: (most rows, tiles, split-K waves), first that fits. Sweep on an
# H200 (scripts/time_fp8_linear_paths.py: DeepSeek-V3's eight FP8 linear shapes at 16 / 32 / 64
# rows, graph-replayed): 64 output columns a program, 4 warps, 4 stages and K split to about two
# programs per SM (1.5 at 64 rows, whose tiles carry four times the MMA work of 16) beat the
# 64 x 128 x 128 tiles of 8 warps unsplit at every shape (1.1-2.2x; q_a 7168 -> 1536 at 64 rows
# 14.9 us against 32.4), and the decode step's sum of these GEMMs fell to 0.50 ms from W8A16's 0.92.
_LINEAR_W8A8 = ((16, TileConfig(16, 64, 128, 4, 4), 2.0), (32, TileConfig(32, 64, 128, 4, 4), 2.0),
                (64, TileConfig(64, 64, 128, 4, 4), 1.5))
# K shorter than this many steps is not split once the grid fills 3/4 of the SMs: the fp32 partials
# and their sum cost more than the fuller GPU gains (shared_down 2048 -> 7168 at 64 rows, 112
# programs: 10.6 us unsplit, 16.0 in two).
W8A8_SHORT_K_STEPS = 64


def w8a8_linear_tiles(rows: int) -> tuple[TileConfig, float]:
    """(tiles, split-K waves; 0 = no split) of a W8A8 fp8_linear over `rows` rows: the decode tiles
    up to 64 rows, above them the prefill tiles (`w8a8_tiles`' down GEMM) unsplit."""
    return next(((t, w) for most, t, w in _LINEAR_W8A8 if rows <= most), (w8a8_tiles(rows)[1], 0.0))


def linear_split_k(programs: int, k_steps: int, sms: int, waves: float = 2.0, min_steps: int = 4, short_k: int = 0) -> int:
    """How many pieces fp8_linear cuts K into when its (row block x column block) grid has
    `programs` programs: at decode sizes a linear with few output columns (DeepSeek-V3's q_a
    7168 -> 1536: 12 programs of 128 columns; kv_a 7168 -> 576: 5) would stream its weight
    through a few SMs. About `waves` programs per SM, rounded to a power of two (on the H100,
    o_proj 16384 -> 7168 at 64 rows in 56 programs: 5 splits 0.120 ms, 4 splits 0.093), then
    capped so that each split is at least `min_steps` K steps long (fp8_linear cuts K into whole
    steps, so the count it launches may be lower still); 1 when the grid already fills the GPU, or
    fills 3/4 of it and K has fewer than `short_k` steps."""
    if programs >= sms or (4 * programs >= 3 * sms and k_steps < short_k):
        return 1
    cap = max(1, k_steps // min_steps)
    want = min(-(-int(waves * sms) // programs), cap)
    return min(1 << round(math.log2(want)), cap)
