"""MLA decode (absorbed form, paged latent cache): the Triton kernels against `mla_decode_reference`.

On a CPU machine they run under Triton's interpreter (set by conftest.py), at toy sizes and in
fp32 / fp16 only; the `gpu` test runs DeepSeek-V3's shape in bf16.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import pytest
import torch

from moecluster.kernels import mla_schedule
from moecluster.kernels.mla_decode import (
    mla_decode,
    mla_decode_bytes,
    mla_decode_reference,
)


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test's id: fresh inputs for every test, reproducible runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@dataclass
class Problem:
    q: torch.Tensor  # (batch, heads, kv_lora_rank + rope_dim)
    kv_cache: torch.Tensor  # (num_blocks, block_size, kv_lora_rank + rope_dim)
    block_tables: torch.Tensor  # (batch, max_blocks)
    seq_lens: torch.Tensor  # (batch,)
    scale: float
    kv_lora_rank: int


def make_problem(
    gen: torch.Generator,
    device: torch.device,
    lens: list[int],
    heads: int,
    kv_lora_rank: int,
    rope_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    cache_dtype: torch.dtype | None = None,
    index_dtype: torch.dtype = torch.int32,
    strided_q: bool = False,
) -> Problem:
    """Random q and cache; each sequence's blocks drawn from a random permutation of the cache
    (scattered, non-contiguous), with spare blocks no sequence owns and one spare table column."""
    dim = kv_lora_rank + rope_dim
    per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(per_seq) + 1
    # Columns past a sequence's blocks point at random (valid) blocks: the reference gathers them
    # for the shorter sequences of a batch, and both sides must mask them out.
    tables = torch.randint(0, num_blocks, (len(lens), width), generator=gen)
    used = 0
    for i, n in enumerate(per_seq):
        tables[i, :n] = perm[used : used + n]
        used += n
    q = torch.randn(len(lens), heads, dim + (8 if strided_q else 0), generator=gen)[..., :dim]
    cache = torch.randn(num_blocks, block_size, dim, generator=gen)
    return Problem(
        q=q.to(device, dtype),
        kv_cache=cache.to(device, cache_dtype or dtype),
        block_tables=tables.to(device, index_dtype),
        seq_lens=torch.tensor(lens, dtype=index_dtype, device=device),
        scale=1.0 / math.sqrt(dim),
        kv_lora_rank=kv_lora_rank,
    )


def run_kernel(p: Problem, **knobs: object) -> torch.Tensor:
    """The launcher into a NaN-poisoned output buffer: every element must be written."""
    out = torch.full((p.q.shape[0], p.q.shape[1], p.kv_lora_rank), float("nan"), dtype=p.q.dtype, device=p.q.device)
    got = mla_decode(p.q, p.kv_cache, p.block_tables, p.seq_lens, p.scale, p.kv_lora_rank, out=out, **knobs)
    assert got is out
    assert not torch.isnan(out).any(), "unwritten (or NaN) output elements"
    return out


def reference(p: Problem) -> torch.Tensor:
    return mla_decode_reference(p.q, p.kv_cache, p.block_tables, p.seq_lens, p.scale, p.kv_lora_rank)


TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=2e-3)}

# (lens, heads, kv_lora_rank, rope_dim, block_size, dtype, knobs)
CASES = [
    # one unit a sequence: stage 1 writes the output; lengths 1, exactly a block, a block + 1, several blocks
    ([1, 16, 17, 50], 4, 64, 16, 16, torch.float32, dict(num_splits=1)),
    # the longest cut in two units, tile (32) straddling two cache pages (16)
    ([1, 16, 17, 50], 4, 64, 16, 16, torch.float32, dict(num_splits=2, block_n=32)),
    # three units for the longest, tile (16) inside a page (32), 16 heads, rank 128
    ([33, 64, 5], 16, 128, 32, 32, torch.float32, dict(num_splits=3, block_n=16)),
    # a count above the longest's tiles: units of one tile
    ([1, 20], 4, 64, 16, 16, torch.float32, dict(num_splits=7, block_n=16)),
    # 20 heads over two head blocks of 16 (the second mostly padding), fp16, rope 64
    ([100, 1, 32], 20, 64, 64, 32, torch.float16, dict(num_splits=3, block_h=16)),
    # 20 heads in one block of 32, default knobs (units planned on the device)
    ([70, 9], 20, 64, 16, 16, torch.float16, dict()),
    # fp16 queries over an fp32 cache (the reference casts the cache to q's dtype), int64 indices
    ([45, 3], 8, 128, 64, 16, torch.float16, dict(num_splits=2, cache_dtype=torch.float32, index_dtype=torch.int64)),
    # a strided q (a view into a wider buffer)
    ([31, 64], 4, 64, 32, 32, torch.float32, dict(num_splits=2, strided_q=True)),
    # tiles of a whole page (block_n == block_size): lengths of whole tiles only, a tail of one
    # token, a tail of all but one; one sequence of a single token (no whole tile at all)
    ([64, 128, 97, 1, 63], 16, 64, 16, 32, torch.float16, dict(num_splits=2, block_n=32)),
    # several tiles per page (block_n 16 in pages of 64), units that end inside a page
    ([200, 129, 16], 4, 64, 16, 64, torch.float32, dict(num_splits=3, block_n=16)),
    # sequences of length 0 (zeros out) beside others, planned and fixed
    ([0, 40, 0, 17], 4, 64, 16, 16, torch.float32, dict()),
    ([0, 90, 3], 4, 64, 16, 16, torch.float32, dict(num_splits=3, block_n=16)),
]


@pytest.mark.parametrize("lens,heads,rank,rope,block_size,dtype,knobs", CASES, ids=[str(i) for i in range(len(CASES))])
def test_matches_reference(gen, device, lens, heads, rank, rope, block_size, dtype, knobs) -> None:
    knobs = dict(knobs)
    make_knobs = {k: knobs.pop(k) for k in ("cache_dtype", "index_dtype", "strided_q") if k in knobs}
    p = make_problem(gen, device, lens, heads, rank, rope, block_size, dtype, **make_knobs)
    out = run_kernel(p, **knobs)
    assert out.shape == (len(lens), heads, rank) and out.dtype == dtype
    torch.testing.assert_close(out, reference(p), **TOL[dtype])


def test_splits_agree(gen, device) -> None:
    """Every split count computes the same attention (fp32: up to rounding)."""
    p = make_problem(gen, device, [77, 40, 1], 4, 64, 16, 16)
    base = run_kernel(p, num_splits=1, block_n=16)
    for splits in (2, 4, 6):
        torch.testing.assert_close(run_kernel(p, num_splits=splits, block_n=16), base, rtol=1e-5, atol=1e-6)


def test_mixed_lengths_default_plan(gen, device) -> None:
    """Unequal lengths with the plan chosen on the device: long sequences cut into units, short
    ones (one of a single token) written by stage 1 directly."""
    p = make_problem(gen, device, [300, 1, 17, 64, 250, 5], 4, 64, 16, 16)
    torch.testing.assert_close(run_kernel(p, block_n=16), reference(p), **TOL[torch.float32])
    torch.testing.assert_close(run_kernel(p), reference(p), **TOL[torch.float32])


def test_plan_kept_per_lengths_tensor(gen, device, monkeypatch) -> None:
    """With a `plans` dict the work plan is made once per seq_lens tensor (a step's layers share
    it) and again for another tensor, even one of equal values."""
    calls = []
    real = mla_schedule.launch_plan
    monkeypatch.setattr(mla_schedule, "launch_plan", lambda *a: calls.append(a) or real(*a))
    p = make_problem(gen, device, [90, 3, 40], 4, 64, 16, 16)
    plans: dict = {}
    want = reference(p)
    for _ in range(3):
        out = mla_decode(p.q, p.kv_cache, p.block_tables, p.seq_lens, p.scale, p.kv_lora_rank, plans=plans)
        torch.testing.assert_close(out, want, **TOL[torch.float32])
    assert len(calls) == 1
    mla_decode(p.q, p.kv_cache, p.block_tables, p.seq_lens.clone(), p.scale, p.kv_lora_rank, plans=plans)
    assert len(calls) == 2
    p.seq_lens[1] = 2  # the same tensor, changed in place: planned again, and right
    got = mla_decode(p.q, p.kv_cache, p.block_tables, p.seq_lens, p.scale, p.kv_lora_rank, plans=plans)
    assert len(calls) == 3
    torch.testing.assert_close(got, reference(p), **TOL[torch.float32])


def test_never_reads_past_length(gen, device) -> None:
    """NaN in every cache slot no sequence owns (the tail of its last block, the spare blocks)
    must not reach the output: the kernel masks those rows rather than multiplying them by 0."""
    lens, block_size = [18, 35], 16
    p = make_problem(gen, device, lens, 4, 64, 16, block_size)
    want = reference(p)
    owned = torch.zeros(p.kv_cache.shape[:2], dtype=torch.bool, device=device)
    for i, n in enumerate(lens):
        for t in range(n):
            owned[p.block_tables[i, t // block_size], t % block_size] = True
    p.kv_cache[~owned] = float("nan")
    torch.testing.assert_close(run_kernel(p, num_splits=2, block_n=32), want, **TOL[torch.float32])
    torch.testing.assert_close(run_kernel(p, num_splits=2, block_n=16), want, **TOL[torch.float32])  # tiles in a page


def test_cpu_path_is_the_reference(gen, monkeypatch) -> None:
    """Without CUDA tensors and without the interpreter the launcher falls back to the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = make_problem(gen, torch.device("cpu"), [5, 19], 4, 64, 16, 16)
    assert torch.equal(run_kernel(p), reference(p))


def test_rejects_bad_inputs(gen, device) -> None:
    p = make_problem(gen, device, [5, 19], 4, 64, 16, 16)
    args = (p.q, p.kv_cache, p.block_tables, p.seq_lens, p.scale, p.kv_lora_rank)

    def call(**overrides: object) -> None:
        names = ("q", "kv_cache", "block_tables", "seq_lens", "scale", "kv_lora_rank")
        kwargs = dict(zip(names, args))
        knobs = {k: overrides.pop(k) for k in list(overrides) if k not in names}
        kwargs.update(overrides)
        mla_decode(**kwargs, **knobs)

    with pytest.raises(ValueError, match="q must be"):
        call(q=p.q[0])
    with pytest.raises(ValueError, match="values per head"):
        call(kv_cache=p.kv_cache[..., :-1])
    with pytest.raises(ValueError, match="kv_lora_rank"):
        call(kv_lora_rank=81)
    with pytest.raises(ValueError, match="batch mismatch"):
        call(seq_lens=p.seq_lens[:1])
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        call(q=p.q.double())
    with pytest.raises(ValueError, match="int32 or int64"):
        call(block_tables=p.block_tables.float())
    with pytest.raises(ValueError, match="out must be"):
        call(out=torch.empty(2, 4, 80, device=device))
    with pytest.raises(ValueError, match="block_h must be a power of two"):
        call(block_h=24)
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        call(block_n=8)
    with pytest.raises(ValueError, match="num_splits"):
        call(num_splits=0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="one device"):
            call(seq_lens=p.seq_lens.cpu() if device.type == "cuda" else p.seq_lens.cuda())


def _plan_on_device(lens, device, head_blocks, resident, capacity, block_n, fixed=0):
    from moecluster.kernels.mla_decode import _interpreting

    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    units, seq_plan, num_units = mla_schedule.launch_plan(
        seq_lens, head_blocks, resident, capacity, block_n, fixed, _interpreting())
    n = int(num_units)
    return [tuple(r) for r in units[:n].tolist()], [tuple(r) for r in seq_plan.tolist()]


@pytest.mark.parametrize("fixed", [0, 3])
def test_plan_kernel_matches_python_rule(gen, device, fixed) -> None:
    """The plan kernel's units equal `plan_units` on random lengths; they tile every sequence
    exactly (whole tiles, consecutive slots) and come longest first after the full ones."""
    for _ in range(4):
        batch = int(torch.randint(1, 40, (1,), generator=gen))
        lens = torch.randint(0, 3000, (batch,), generator=gen).tolist()
        lens[0] = 0  # a sequence of length 0: one empty unit
        head_blocks, resident, block_n = 2, 8, 64
        capacity = mla_schedule.capacity(batch, head_blocks, resident, fixed)
        want = mla_schedule.plan_units(lens, head_blocks, resident, capacity, block_n, fixed)
        got = _plan_on_device(lens, device, head_blocks, resident, capacity, block_n, fixed)
        assert got == want
        units, seq_plan = want
        assert len(units) <= capacity
        assert sorted(u[3] for u in units) == list(range(len(units)))  # every slot once
        for b, (first, count) in enumerate(seq_plan):
            mine = sorted((u for u in units if u[0] == b), key=lambda u: u[3])
            assert [u[3] for u in mine] == list(range(first, first + count))
            assert mine[0][1] == 0 and mine[-1][2] == lens[b]
            assert all(u[2] - u[1] == mine[0][2] for u in mine[:-1])  # all but the last: one unit size
            assert all(x[2] == y[1] and x[1] % block_n == 0 for x, y in zip(mine, mine[1:]))
        sizes = [u[2] - u[1] for u in units]
        assert sizes == sorted(sizes, reverse=True)  # full units, then the last ones by length


def test_plans_not_kept_for_inference_tensors(gen, device) -> None:
    p = make_problem(gen, device, [90, 3], 4, 64, 16, 16)
    plans: dict = {}
    with torch.inference_mode():
        lens = p.seq_lens.clone()
        out = mla_decode(p.q, p.kv_cache, p.block_tables, lens, p.scale, p.kv_lora_rank, plans=plans)
    torch.testing.assert_close(out, reference(p), **TOL[torch.float32])
    assert plans == {}


def test_too_many_units_for_a_grid(gen, device) -> None:
    p = make_problem(gen, device, [90, 3], 4, 64, 16, 16)
    with pytest.raises(ValueError, match="more than a launch grid holds"):
        mla_decode(p.q, p.kv_cache, p.block_tables, p.seq_lens, p.scale, p.kv_lora_rank, num_splits=40000)


def test_plan_needs_room_for_every_sequence(device) -> None:
    lens = torch.tensor([5, 6, 7], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="capacity 2 cannot hold 3"):
        mla_schedule.launch_plan(lens, 1, 4, 2, 16, 0, True)
    with pytest.raises(ValueError, match="fixed 2 each"):
        mla_schedule.launch_plan(lens, 1, 4, 5, 16, 2, True)


def test_plan_rule() -> None:
    """Equal lengths keep the split counts measured fastest on the H100 (wave model): 128 heads in
    two blocks of 64, 132 SMs, one program an SM, context 4096 in tiles of 64."""
    def units_per_seq(batch, length, resident=132, head_blocks=2):
        units, plan = mla_schedule.plan_units([length] * batch, head_blocks, resident,
                                              batch + -(-resident // head_blocks), 64)
        return {count for _, count in plan}

    assert units_per_seq(8, 4096) == {8}  # 16 programs a split: 8 splits fill the SMs once
    assert units_per_seq(32, 4096) == {2}  # 2 splits are one wave, 3 would be two (185 vs 249 us)
    assert units_per_seq(256, 4096) == {1}  # enough programs already
    assert units_per_seq(1, 100) == {2}  # no more units than tiles
    # mixed lengths: the longest sequence is cut, so that it no longer sets the launch's length
    units, plan = mla_schedule.plan_units([32768] + [512] * 63, 2, 132, 64 + 66, 64)
    assert plan[0][1] > 1 and all(count == 1 for _, count in plan[1:])
    assert max(u[2] - u[1] for u in units) <= 32768 // 2
    # an empty sequence keeps one (empty) unit, so its output is written
    units, plan = mla_schedule.plan_units([0, 70], 1, 4, 6, 64)
    assert plan[0] == (0, 1) and (0, 0, 0, 0) in units


def test_bytes() -> None:
    # two sequences, 576-wide rows in bf16, 128 heads: cache + q + out + seq_lens
    want = (10 + 30) * 576 * 2 + 2 * 128 * (576 + 512) * 2 + 2 * 4
    assert mla_decode_bytes([10, 30], 128, 576, 512, torch.bfloat16) == want
    assert mla_decode_bytes(torch.tensor([10, 30]), 128, 576, 512, torch.bfloat16) == want


@pytest.mark.gpu
@pytest.mark.parametrize(
    "heads,knobs",
    [(128, dict()), (128, dict(num_splits=1)), (64, dict()), (128, dict(block_h=32, block_n=64, num_warps=4))],
)
def test_deepseek_shape_bf16(heads: int, knobs: dict) -> None:
    """DeepSeek-V3 (128 heads) / Kimi K2 (64 heads) on one GPU: 576-wide rows, pages of 64, bf16."""
    gen = torch.Generator().manual_seed(heads)
    lens = [1, 64, 65, 1000, 4096, 2047, 3000, 130]
    p = make_problem(gen, torch.device("cuda"), lens, heads, 512, 64, 64, torch.bfloat16)
    p.scale = 1.0 / math.sqrt(192)  # qk_nope_head_dim + qk_rope_head_dim
    out = run_kernel(p, **knobs).float()
    exact = mla_decode_reference(
        p.q.float(), p.kv_cache.float(), p.block_tables, p.seq_lens, p.scale, p.kv_lora_rank
    )  # fp32 oracle
    rel = (out - exact).norm() / exact.norm()
    rel_ref = (reference(p).float() - exact).norm() / exact.norm()
    assert rel < max(1e-2, 2 * rel_ref), (rel.item(), rel_ref.item())
    torch.testing.assert_close(out, reference(p).float(), rtol=2e-2, atol=2e-2)
