"""The work list of an MLA decode launch: which stage-1 program reads which tokens of which sequence.

A decode batch mixes short and long sequences. Cutting every sequence into the same number of
splits leaves a launch as long as its longest sequence's split while most SMs idle (measured on
the H100 at 128 heads, batch 64, lengths drawn from 1..32K: 48% of copy bandwidth where equal
lengths reach 71%). Instead every sequence is cut into *units* of at most `unit_tiles` tiles of
the same size for the whole batch: a long sequence gets several, a short one a single unit. The
unit size is chosen on the GPU from the lengths themselves (no host sync, so CUDA graphs replay
it with each step's lengths), among the sizes that give the longest sequence 1..64 units
(`CANDIDATES`) by a makespan estimate: the longer of the full units' waves, `ceil(head_blocks *
full_units / resident) * (unit_tiles + overhead)` (last units of at least 3/4 of a unit count as
full), and every program's tiles spread over the SMs,
`head_blocks * (total_tiles + units * overhead) / resident`, where
`overhead` (in tiles) is a unit's fixed cost (q, its partial's store and merge, the pipeline's
fill). Ties go to fewer units. Units are also capped at `capacity`, the stage-1 grid's size per
head block (the programs past the unit count only read that count and stop).

Programs take units in launch order, longest first (the hardware starts them about in order, so
this is the longest-processing-time-first list schedule): every sequence's full units, then
each sequence's last unit by length. The estimate's first term is the waves of full units.

Outputs (int32, on the lengths' device):
* units (capacity, 4): (sequence, first token, end token, partial slot) of the u-th unit in launch
  order, for u < num_units; a sequence's slots are consecutive;
* seq_plan (batch, 2): (first unit, unit count) of each sequence: a count of 1 means stage 1
  writes that sequence's output itself and stage 2 leaves it alone;
* num_units (1,).

An empty sequence (length 0) still gets one, empty, unit, so that its output is written (zeros).
`plan_units` is the same rule in Python, for tests.
"""

from __future__ import annotations

import functools

import torch

try:  # the CPU path needs only torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency wherever the kernels run
    triton = None
    tl = None

# The unit counts tried for the longest sequence: every count up to 8, then 12, 16, 24, 32, 48, 64
# (16 lanes, the last three all 64), so that one vector covers them; `_mla_plan` computes the same.
CANDIDATES = tuple(i + 1 if i < 8 else min((12 if (i - 8) % 2 == 0 else 16) << ((i - 8) // 2), 64) for i in range(16))
# A unit's fixed cost in cache rows (q, its partial's store, stage 2's read of it, the pipeline's
# fill), and the share of a unit from which a sequence's last unit counts as a full one in the
# waves: both fitted on an H100 to 96 timings of fixed unit counts (16 shapes x 1, 2, 3, 4, 6, 8;
# `scripts/time_mla_plan.py --splits`), where the rule picks the fastest count in 14 of the 16 shapes
# and is at most 7% off in the other two (docs/performance.md).
OVERHEAD_TOKENS = 768
BIG_TAIL = (3, 4)  # a last unit of at least 3/4 of a unit is a full one


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan_units(
    lens: list[int], head_blocks: int, resident: int, capacity: int, block_n: int, fixed_splits: int = 0
) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int]]]:
    """The rule of `_mla_plan` in Python: (units in launch order as (sequence, first token, end
    token, partial slot), seq_plan as (first slot, count)). fixed_splits > 0 takes that many units
    for the longest sequence."""
    tiles = [_cdiv(n, block_n) for n in lens]
    total, longest = sum(tiles), max(tiles, default=0)
    overhead = _cdiv(OVERHEAD_TOKENS, block_n)
    if fixed_splits:
        best = fixed_splits
    else:
        best, best_cost = 1, None
        for splits in CANDIDATES:
            unit = max(_cdiv(longest, splits), 1)
            units = sum(max(_cdiv(t, unit), 1) for t in tiles)
            full = sum(t // unit + (BIG_TAIL[1] * (t % unit) >= BIG_TAIL[0] * unit) for t in tiles)
            cost = max(_cdiv(head_blocks * full, resident) * (unit + overhead),
                       _cdiv(head_blocks * (total + units * overhead), resident))
            if units <= capacity and (best_cost is None or cost < best_cost):
                best, best_cost = splits, cost
    unit = max(_cdiv(longest, best), 1)
    seq_plan: list[tuple[int, int]] = []
    first = 0
    for t in tiles:
        seq_plan.append((first, max(_cdiv(t, unit), 1)))
        first += seq_plan[-1][1]
    step = unit * block_n
    order = [(b, j * step, (j + 1) * step, first + j) for b, (first, k) in enumerate(seq_plan) for j in range(k - 1)]
    tails = sorted(range(len(lens)), key=lambda b: (lens[b] - (seq_plan[b][1] - 1) * step, b), reverse=True)
    order += [(b, (seq_plan[b][1] - 1) * step, lens[b], seq_plan[b][0] + seq_plan[b][1] - 1) for b in tails]
    return order, seq_plan


def _mla_plan(
    SeqLens,  # (batch,) int32 / int64
    Units,  # (capacity, 4) int32 out
    SeqPlan,  # (batch, 2) int32 out
    NumUnits,  # (1,) int32 out
    batch,
    head_blocks,
    resident,
    capacity,
    fixed_splits,  # 0: choose
    overhead,  # tiles
    NUM_CAND: tl.constexpr,
    TAIL_NUM: tl.constexpr,  # BIG_TAIL
    TAIL_DEN: tl.constexpr,
    BLOCK_B: tl.constexpr,  # batch padded to a power of two
    BLOCK_N: tl.constexpr,  # tokens per tile (stage 1's)
):
    offs = tl.arange(0, BLOCK_B)
    valid = offs < batch
    lens = tl.load(SeqLens + offs, mask=valid, other=0).to(tl.int32)
    tiles = tl.cdiv(lens, BLOCK_N)  # (BLOCK_B,), 0 past the batch
    total = tl.sum(tiles, 0)
    longest = tl.max(tiles, 0)

    # every candidate at once: (NUM_CAND, BLOCK_B) unit counts
    idx = tl.arange(0, NUM_CAND)
    cand = tl.where(idx < 8, idx + 1, tl.minimum(tl.where((idx - 8) % 2 == 0, 12, 16) << ((idx - 8) // 2), 64))
    unit_c = tl.maximum(tl.cdiv(longest, cand), 1)  # (NUM_CAND,) tiles a unit
    per_seq = tl.maximum(tl.cdiv(tiles[None, :], unit_c[:, None]), 1)
    units_c = tl.sum(tl.where(valid[None, :], per_seq, 0), 1)  # (NUM_CAND,)
    rest = tiles[None, :] % unit_c[:, None]
    big = tiles[None, :] // unit_c[:, None] + (TAIL_DEN * rest >= TAIL_NUM * unit_c[:, None]).to(tl.int32)
    full_c = tl.sum(big, 1)  # units of unit_c tiles, and last units nearly as long
    waves = tl.cdiv(head_blocks * full_c, resident) * (unit_c + overhead)
    cost = tl.maximum(waves, tl.cdiv(head_blocks * (total + units_c * overhead), resident))
    key = tl.where(units_c <= capacity, cost * NUM_CAND + idx, 2147483647)  # ties: the fewer units
    pick = tl.min(key, 0) % NUM_CAND  # lane 0 (one unit a sequence) always fits a valid capacity
    best = tl.where(fixed_splits > 0, fixed_splits, tl.sum(tl.where(idx == pick, cand, 0), 0))

    unit = tl.maximum(tl.cdiv(longest, best), 1)
    count = tl.where(valid, tl.maximum(tl.cdiv(tiles, unit), 1), 0)  # (BLOCK_B,) units per sequence
    first = tl.cumsum(count, 0) - count  # each sequence's partial slots: first .. first + count - 1
    tl.store(SeqPlan + offs * 2, first, mask=valid)
    tl.store(SeqPlan + offs * 2 + 1, count, mask=valid)
    tl.store(NumUnits, tl.sum(count, 0))
    # Launch order, longest first: every sequence's units but its last (all `unit` tiles long) ...
    body = tl.where(valid, count - 1, 0)
    body_first = tl.cumsum(body, 0) - body
    n_body = tl.sum(body, 0)
    for j in range(0, best - 1):
        has = valid & (j < body)
        u = body_first + j
        start = j * unit * BLOCK_N
        tl.store(Units + u * 4, offs, mask=has)
        tl.store(Units + u * 4 + 1, start, mask=has)
        tl.store(Units + u * 4 + 2, start + unit * BLOCK_N, mask=has)
        tl.store(Units + u * 4 + 3, first + j, mask=has)
    # ... then the last units, sorted by length (ties: the later sequence first)
    tail_start = body * unit * BLOCK_N
    key = tl.where(valid, (lens - tail_start).to(tl.int64) * BLOCK_B + offs, -1)
    key = tl.sort(key, 0, descending=True)
    b = (key % BLOCK_B).to(tl.int32)
    has = key >= 0
    u = n_body + offs
    tl.debug_barrier()  # SeqPlan above is read back below, for the sorted sequences
    count_b = tl.load(SeqPlan + b * 2 + 1, mask=has, other=1)
    start = (count_b - 1) * unit * BLOCK_N
    tl.store(Units + u * 4, b, mask=has)
    tl.store(Units + u * 4 + 1, start, mask=has)
    tl.store(Units + u * 4 + 2, tl.load(SeqLens + b, mask=has, other=0).to(tl.int32), mask=has)
    tl.store(Units + u * 4 + 3, tl.load(SeqPlan + b * 2, mask=has, other=0) + count_b - 1, mask=has)


@functools.cache
def _jitted(interpret: bool):
    """The plan kernel through triton.jit, keyed on the interpreter flag (see mla_decode._jitted)."""
    del interpret
    return triton.jit(_mla_plan, do_not_specialize=["batch", "capacity", "fixed_splits"])


def capacity(batch: int, head_blocks: int, resident: int, fixed_splits: int = 0) -> int:
    """Units the stage-1 grid holds per head block: with a fixed count, that many a sequence; else one
    a sequence and another wave of programs to cut the long ones with."""
    return batch * fixed_splits if fixed_splits else batch + _cdiv(resident, head_blocks)


def launch_plan(
    seq_lens: torch.Tensor, head_blocks: int, resident: int, capacity: int, block_n: int, fixed_splits: int,
    interpreting: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(units (capacity, 4), seq_plan (batch, 2), num_units (1,)), int32, from one program on the GPU.
    capacity must hold every sequence's units: at least batch, or batch * fixed_splits."""
    batch = seq_lens.shape[0]
    if capacity < batch * max(1, fixed_splits):
        raise ValueError(f"capacity {capacity} cannot hold {batch} sequences' units "
                         f"({'fixed ' + str(fixed_splits) if fixed_splits else 'at least 1'} each)")
    buf = torch.empty(capacity * 4 + batch * 2 + 1, dtype=torch.int32, device=seq_lens.device)
    units = buf[: capacity * 4].view(capacity, 4)
    seq_plan = buf[capacity * 4 : capacity * 4 + batch * 2].view(batch, 2)
    num_units = buf[capacity * 4 + batch * 2 :]
    block_b = max(16, triton.next_power_of_2(batch))
    _jitted(interpreting)[(1,)](
        seq_lens, units, seq_plan, num_units, batch, head_blocks, resident, capacity,
        fixed_splits, _cdiv(OVERHEAD_TOKENS, block_n), NUM_CAND=len(CANDIDATES), TAIL_NUM=BIG_TAIL[0],
        TAIL_DEN=BIG_TAIL[1],
        BLOCK_B=block_b, BLOCK_N=block_n, num_warps=min(16, max(4, block_b // 128)),
    )  # fmt: skip
    return units, seq_plan, num_units
