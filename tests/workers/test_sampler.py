"""The batched sampler: greedy, temperature, top-k / top-p / min-p filters, seeds, logprobs.

Filters are checked on logits whose allowed set is known (hand-built distributions, and many rows
of random logits against a float64 reference), over thousands of draws in one batched call.
Filter order follows vLLM: temperature first, top-k, then top-p over the renormalised top-k mass.
"""

from __future__ import annotations

import math

import pytest
import torch

from moecluster.workers.engine.sampler import SamplingBatch, sample


def col(value: object, rows: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * rows


def make_batch(
    rows: int,
    vocab: int,
    *,
    temperature: float | list[float] = 1.0,
    top_k: int | list[int] = -1,
    top_p: float | list[float] = 1.0,
    min_p: float | list[float] = 0.0,
    generators: list[torch.Generator | None] | None = None,
    num_logprobs: int = 0,
) -> SamplingBatch:
    return SamplingBatch.build(
        temperature=col(temperature, rows),
        top_k=col(top_k, rows),
        top_p=col(top_p, rows),
        min_p=col(min_p, rows),
        generators=generators if generators is not None else [None] * rows,
        num_logprobs=num_logprobs,
        vocab_size=vocab,
        device="cpu",
    )


def logits_from_probs(probs: list[float], perm_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocab,) logits whose softmax is `probs` laid out in a shuffled order; returns (logits, order)
    where order[i] is the vocab id that carries probs[i]."""
    g = torch.Generator().manual_seed(perm_seed)
    order = torch.randperm(len(probs), generator=g)
    logits = torch.empty(len(probs))
    logits[order] = torch.log(torch.tensor(probs, dtype=torch.float64)).float() + 0.7  # shift: softmax-invariant
    return logits, order


def draw(logits_row: torch.Tensor, n: int, **kw: object) -> torch.Tensor:
    """n independent draws from one row (as n rows of one batch)."""
    logits = logits_row.expand(n, -1).clone()
    return sample(logits, make_batch(n, logits.shape[-1], **kw)).token_ids  # type: ignore[arg-type]


def allowed_ids(order: torch.Tensor, keep: int) -> set[int]:
    return set(order[:keep].tolist())


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- SamplingBatch.build


def test_build_normalises_top_k_and_flags_greedy() -> None:
    b = make_batch(5, 100, temperature=[0.0, 0.0, 0.5, 0.0, 1.0], top_k=[-1, 0, 5, 100, 5000])
    assert b.top_k.tolist() == [100, 100, 5, 100, 100]
    assert b.top_k.dtype == torch.int64
    assert b.temperature.dtype == torch.float32 and b.top_p.dtype == torch.float32 and b.min_p.dtype == torch.float32
    assert b.temperature.tolist() == [0.0, 0.0, 0.5, 0.0, 1.0]
    assert b.all_greedy is False
    assert isinstance(b.generators, tuple) and len(b.generators) == 5
    assert make_batch(3, 10, temperature=0.0).all_greedy is True


def test_build_keeps_per_row_values() -> None:
    gens = [None, seeded(1), None]
    b = make_batch(3, 50, top_p=[1.0, 0.5, 0.9], min_p=[0.0, 0.1, 0.2], generators=gens, num_logprobs=4)
    assert b.top_p.tolist() == pytest.approx([1.0, 0.5, 0.9])
    assert b.min_p.tolist() == pytest.approx([0.0, 0.1, 0.2])
    assert b.generators[1] is gens[1] and b.generators[0] is None
    assert b.num_logprobs == 4


# ---------------------------------------------------------------- greedy


def test_greedy_equals_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(256, 97) * 4
    out = sample(logits, make_batch(256, 97, temperature=0.0))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.token_ids.dtype == torch.int64 and out.token_ids.shape == (256,)
    assert torch.all(out.ranks == 1)


def test_all_greedy_fast_path_equals_the_general_path() -> None:
    """All rows greedy, no top logprobs: the one-read path gives the tokens, logprobs and ranks the
    general path (log_softmax, rank count) gives for the same rows."""
    torch.manual_seed(1)
    logits = torch.randn(9, 301) * 5
    logits[2, [10, 200]] = 30.0  # a tie: the first index, rank 1
    fast = sample(logits, make_batch(9, 301, temperature=0.0))
    mixed = sample(logits.repeat(2, 1), make_batch(18, 301, temperature=[0.0] * 17 + [1.0]))  # not all greedy
    assert torch.equal(fast.token_ids, mixed.token_ids[:9]) and fast.token_ids[2] == 10
    torch.testing.assert_close(fast.logprobs, mixed.logprobs[:9], rtol=1e-6, atol=1e-6)
    assert torch.equal(fast.ranks, mixed.ranks[:9]) and fast.top_ids is None and fast.top_logprobs is None


def test_greedy_ignores_filters_and_noise() -> None:
    torch.manual_seed(1)
    logits = torch.randn(64, 40)
    a = sample(logits, make_batch(64, 40, temperature=0.0, top_k=3, top_p=0.2, min_p=0.5)).token_ids
    b = sample(logits, make_batch(64, 40, temperature=0.0, generators=[seeded(i) for i in range(64)])).token_ids
    assert torch.equal(a, logits.argmax(-1)) and torch.equal(b, logits.argmax(-1))


def test_top_k_one_and_tiny_temperature_are_argmax() -> None:
    torch.manual_seed(2)
    logits = torch.randn(500, 30) * 2
    argmax = logits.argmax(-1)
    assert torch.equal(sample(logits, make_batch(500, 30, temperature=1.7, top_k=1)).token_ids, argmax)
    assert torch.equal(sample(logits, make_batch(500, 30, temperature=1e-4)).token_ids, argmax)


def test_peaked_and_masked_logits_give_no_nan() -> None:
    logits = torch.full((300, 20), -1e4)
    logits[:, 7] = 1e4
    logits[:, 3] = float("-inf")
    out = sample(logits, make_batch(300, 20, temperature=2.0, top_p=0.9, min_p=0.05))
    assert torch.all(out.token_ids == 7)
    assert torch.all(torch.isfinite(out.logprobs))


# ---------------------------------------------------------------- filters on known sets


def test_neg_inf_tokens_are_never_drawn() -> None:
    torch.manual_seed(3)
    logits = torch.zeros(12)
    logits[[0, 4, 5, 9, 11]] = float("-inf")
    for kw in (dict(), dict(temperature=3.0), dict(top_k=10), dict(top_p=0.99), dict(min_p=1e-3)):
        got = set(draw(logits, 3000, **kw).tolist())
        assert got == {1, 2, 3, 6, 7, 8, 10}, kw


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_known_set(k: int) -> None:
    torch.manual_seed(10 + k)
    probs = [0.3, 0.25, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01]
    logits, order = logits_from_probs(probs, perm_seed=k)
    got = set(draw(logits, 4000, top_k=k).tolist())
    assert got == allowed_ids(order, k)  # nothing outside, and every allowed token shows up


@pytest.mark.parametrize(
    "top_p, keep",
    [
        (1.0, 4),
        (0.95, 4),  # mass before the last token is 0.9 < 0.95
        (0.85, 3),  # 0.4+0.3+0.2 = 0.9 reaches it
        (0.75, 3),
        (0.65, 2),  # 0.4+0.3 = 0.7 reaches it
        (0.5, 2),
        (0.35, 1),  # the best token alone (0.4) reaches it
        (1e-4, 1),  # always at least the best token
    ],
)
def test_top_p_keeps_smallest_prefix_reaching_p(top_p: float, keep: int) -> None:
    torch.manual_seed(20)
    logits, order = logits_from_probs([0.4, 0.3, 0.2, 0.1], perm_seed=3)
    got = set(draw(logits, 4000, top_p=top_p).tolist())
    assert got == allowed_ids(order, keep)


def test_top_p_applies_to_the_temperature_scaled_distribution() -> None:
    # p ~ [0.4, 0.3, 0.2, 0.1]; at T=0.5 it becomes ~[0.533, 0.3, 0.133, 0.033]: top_p 0.8 is
    # reached after two tokens (0.833), whereas on the unscaled distribution it would take three.
    torch.manual_seed(21)
    logits, order = logits_from_probs([0.4, 0.3, 0.2, 0.1], perm_seed=4)
    got = set(draw(logits, 4000, temperature=0.5, top_p=0.8).tolist())
    assert got == allowed_ids(order, 2)
    # T=2 flattens it to ~[0.325, 0.282, 0.230, 0.163]: the mass before the last token is 0.837,
    # under top_p 0.85, so all four stay (unscaled, 0.9 before the last would drop it).
    got = set(draw(logits, 4000, temperature=2.0, top_p=0.85).tolist())
    assert got == allowed_ids(order, 4)


def test_top_p_uses_mass_renormalised_after_top_k() -> None:
    # top-2 of [0.4, 0.3, 0.2, 0.1] renormalises to [0.571, 0.429]: top_p 0.5 keeps only the best.
    torch.manual_seed(22)
    logits, order = logits_from_probs([0.4, 0.3, 0.2, 0.1], perm_seed=5)
    assert set(draw(logits, 3000, top_k=2, top_p=0.5).tolist()) == allowed_ids(order, 1)
    assert set(draw(logits, 3000, top_k=3, top_p=0.7).tolist()) == allowed_ids(order, 2)
    assert set(draw(logits, 3000, top_k=3, top_p=0.9).tolist()) == allowed_ids(order, 3)


@pytest.mark.parametrize(
    "min_p, keep",
    [
        (0.0, 5),
        (0.05, 5),  # floor 0.025 < 0.05
        (0.15, 4),  # floor 0.075: drops 0.05
        (0.25, 3),  # floor 0.125: keeps 0.5, 0.2, 0.15
        (0.35, 2),  # floor 0.175
        (0.5, 1),  # floor 0.25
        (1.0, 1),  # only the max itself
    ],
)
def test_min_p_relative_to_max_prob(min_p: float, keep: int) -> None:
    torch.manual_seed(30)
    logits, order = logits_from_probs([0.5, 0.2, 0.15, 0.1, 0.05], perm_seed=6)
    got = set(draw(logits, 4000, min_p=min_p).tolist())
    assert got == allowed_ids(order, keep)


def test_min_p_combined_with_top_k() -> None:
    torch.manual_seed(31)
    logits, order = logits_from_probs([0.5, 0.2, 0.15, 0.1, 0.05], perm_seed=7)
    assert set(draw(logits, 3000, min_p=0.15, top_k=2).tolist()) == allowed_ids(order, 2)
    assert set(draw(logits, 3000, min_p=0.35, top_k=4).tolist()) == allowed_ids(order, 2)


# ---------------------------------------------------------------- filters on many random rows


def _reference_allowed(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       eps: float = 1e-5) -> torch.Tensor:
    """float64 reference: (rows, vocab) bool, True where top-k then top-p (vLLM order) may keep a
    token; ambiguous boundary cases (mass within eps of p) count as allowed."""
    scaled = logits.double() / temperature.double()[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    pos = torch.arange(vocab)[None, :]
    in_k = pos < top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~in_k, float("-inf")), dim=-1)
    before = probs.cumsum(-1) - probs
    keep_sorted = in_k & ((before < top_p.double()[:, None] + eps) | (pos == 0))
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def test_random_rows_only_draw_allowed_tokens() -> None:
    torch.manual_seed(40)
    rows, vocab = 3000, 48
    logits = torch.randn(rows, vocab) * 3
    temperature = torch.rand(rows) * 1.5 + 0.2
    top_k = torch.randint(1, vocab + 8, (rows,))
    top_p = torch.rand(rows) * 0.9 + 0.05
    batch = make_batch(rows, vocab, temperature=temperature.tolist(), top_k=top_k.tolist(), top_p=top_p.tolist())
    allowed = _reference_allowed(logits, temperature, batch.top_k, top_p)
    for _ in range(3):
        tokens = sample(logits, batch).token_ids
        assert allowed.gather(1, tokens[:, None]).all()


def test_random_rows_min_p_only_draws_above_floor() -> None:
    torch.manual_seed(41)
    rows, vocab = 3000, 48
    logits = torch.randn(rows, vocab) * 2
    temperature = torch.rand(rows) + 0.3
    min_p = torch.rand(rows) * 0.6
    batch = make_batch(rows, vocab, temperature=temperature.tolist(), min_p=min_p.tolist())
    probs = torch.softmax(logits.double() / temperature.double()[:, None], dim=-1)
    floor = min_p.double() * probs.max(-1).values
    for _ in range(3):
        tokens = sample(logits, batch).token_ids
        chosen = probs.gather(1, tokens[:, None]).squeeze(1)
        assert torch.all(chosen >= floor - 1e-6)


# ---------------------------------------------------------------- distributions


def _chi_square(tokens: torch.Tensor, expected_probs: torch.Tensor) -> float:
    n = tokens.numel()
    observed = torch.bincount(tokens, minlength=expected_probs.numel()).double()
    expected = expected_probs.double() * n
    support = expected > 0
    assert observed[~support].sum() == 0, "drew a token of probability 0"
    return float(((observed[support] - expected[support]) ** 2 / expected[support]).sum())


# chi-square with 5 degrees of freedom: P(X > 30) ~ 1.5e-5, so a correct sampler never trips this.
CHI2_LIMIT = 30.0
LOGITS6 = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0])


def test_temperature_one_matches_softmax() -> None:
    torch.manual_seed(50)
    tokens = draw(LOGITS6, 6000)
    assert _chi_square(tokens, torch.softmax(LOGITS6, -1)) < CHI2_LIMIT


def test_temperature_scales_the_distribution() -> None:
    torch.manual_seed(51)
    for t in (0.5, 2.0):
        tokens = draw(LOGITS6, 6000, temperature=t)
        assert _chi_square(tokens, torch.softmax(LOGITS6 / t, -1)) < CHI2_LIMIT, t


def test_filtered_distribution_is_renormalised_softmax() -> None:
    torch.manual_seed(52)
    tokens = draw(LOGITS6, 6000, top_k=4)
    expected = torch.softmax(LOGITS6.masked_fill(LOGITS6 < LOGITS6.topk(4).values[-1], float("-inf")), -1)
    assert _chi_square(tokens, expected) < CHI2_LIMIT


def test_seeded_rows_follow_the_distribution_too() -> None:
    rows = 3000
    tokens = draw(LOGITS6, rows, generators=[seeded(1000 + i) for i in range(rows)])
    assert _chi_square(tokens, torch.softmax(LOGITS6, -1)) < CHI2_LIMIT


# ---------------------------------------------------------------- seeds and mixed batches


def _seeded_run(seed: int, row_logits: torch.Tensor, others: torch.Tensor, position: int, steps: int,
                global_seed: int, **row_kw: object) -> list[int]:
    """`steps` draws for one seeded row placed at `position` among rows `others` of other settings."""
    torch.manual_seed(global_seed)
    gen = seeded(seed)
    rows = others.shape[0] + 1
    logits = torch.cat([others[:position], row_logits[None], others[position:]])
    temps = [0.0 if i % 3 == 0 else 0.8 for i in range(rows)]
    gens: list[torch.Generator | None] = [None] * rows
    temps[position], gens[position] = float(row_kw.get("temperature", 1.0)), gen
    top_k = [-1] * rows
    top_k[position] = int(row_kw.get("top_k", -1))  # type: ignore[call-overload]
    batch = make_batch(rows, logits.shape[-1], temperature=temps, top_k=top_k, generators=gens)
    return [int(sample(logits, batch).token_ids[position]) for _ in range(steps)]


def test_seeded_row_is_reproducible_and_independent_of_the_batch() -> None:
    torch.manual_seed(60)
    vocab = 64
    row = torch.randn(vocab) * 0.5
    a = _seeded_run(123, row, torch.randn(5, vocab), position=2, steps=15, global_seed=1)
    b = _seeded_run(123, row, torch.randn(9, vocab) * 3, position=7, steps=15, global_seed=2)
    c = _seeded_run(123, row, torch.randn(0, vocab), position=0, steps=15, global_seed=3)
    assert a == b == c
    assert len(set(a)) > 5  # it is random, not stuck on one token
    d = _seeded_run(124, row, torch.randn(5, vocab), position=2, steps=15, global_seed=1)
    assert d != a


def test_seeded_row_with_filters_is_reproducible() -> None:
    torch.manual_seed(61)
    row = torch.randn(64)
    a = _seeded_run(7, row, torch.randn(3, 64), position=1, steps=15, global_seed=4, temperature=0.7, top_k=5)
    b = _seeded_run(7, row, torch.randn(6, 64), position=4, steps=15, global_seed=5, temperature=0.7, top_k=5)
    assert a == b
    assert set(a) <= set(row.topk(5).indices.tolist())


def test_unseeded_rows_vary() -> None:
    torch.manual_seed(62)
    logits = torch.zeros(200, 50)
    batch = make_batch(200, 50)
    a, b = sample(logits, batch).token_ids, sample(logits, batch).token_ids
    assert not torch.equal(a, b)
    assert len(set(a.tolist())) > 20  # rows of one call differ from each other too


def test_mixed_batch() -> None:
    """Greedy rows, unseeded sampled rows, seeded rows and filtered rows in one batch."""
    torch.manual_seed(63)
    vocab = 32
    flat = torch.zeros(vocab)
    peaked, order = logits_from_probs([0.4, 0.3, 0.2, 0.1] + [0.0] * (vocab - 4), perm_seed=8)
    rnd = torch.randn(vocab) * 2
    layout = [  # (logits, temperature, top_k, top_p, min_p, seed)
        (rnd, 0.0, -1, 1.0, 0.0, None),
        (flat, 1.0, -1, 1.0, 0.0, None),
        (flat, 1.0, -1, 1.0, 0.0, 5),
        (peaked, 1.0, 2, 1.0, 0.0, None),
        (rnd, 0.0, 3, 0.5, 0.2, 6),
        (peaked, 1.3, -1, 0.65, 0.0, None),
        (peaked, 0.9, -1, 1.0, 0.6, 9),
        (rnd, 1.0, 4, 1.0, 0.0, None),
    ]
    copies = 300  # the layout repeated: copy j of a seeded row uses seed + 1000 * j
    rows = [r for _ in range(copies) for r in layout]
    logits = torch.stack([r[0] for r in rows])

    def run() -> torch.Tensor:
        batch = make_batch(
            len(rows), vocab,
            temperature=[r[1] for r in rows], top_k=[r[2] for r in rows], top_p=[r[3] for r in rows],
            min_p=[r[4] for r in rows],
            generators=[None if r[5] is None else seeded(r[5] + 1000 * (i // len(layout))) for i, r in enumerate(rows)],
        )
        return sample(logits, batch).token_ids.view(copies, len(layout))  # (copies, layout rows)

    first, second = run(), run()
    assert torch.all(first[:, 0] == rnd.argmax()) and torch.all(first[:, 4] == rnd.argmax())
    assert torch.equal(first[:, 2], second[:, 2]) and torch.equal(first[:, 6], second[:, 6])  # seeded
    assert not torch.equal(first[:, 1], second[:, 1])  # unseeded
    assert len(set(first[:, 1].tolist())) > 20 and len(set(first[:, 2].tolist())) > 20
    assert set(first[:, 3].tolist()) == allowed_ids(order, 2)
    assert set(first[:, 5].tolist()) == allowed_ids(order, 2)  # T=1.3: ~[.37,.30,.22,.11], 0.65 after 2
    assert set(first[:, 6].tolist()) == allowed_ids(order, 2)  # T=0.9 floor 0.6*p_max keeps two
    assert set(first[:, 7].tolist()) <= set(rnd.topk(4).indices.tolist())
    assert len(set(first[:, 7].tolist())) > 1


# ---------------------------------------------------------------- logprobs


def test_logprobs_ranks_and_top_logprobs() -> None:
    torch.manual_seed(70)
    rows, vocab, k = 400, 40, 5
    logits = torch.randn(rows, vocab) * 3
    temps = [0.0 if i % 4 == 0 else 0.3 + (i % 7) * 0.3 for i in range(rows)]
    batch = make_batch(rows, vocab, temperature=temps, top_k=[-1, 10, 3, -1] * (rows // 4),
                       top_p=[1.0, 1.0, 0.9, 0.8] * (rows // 4), num_logprobs=k)
    out = sample(logits, batch)
    raw = torch.log_softmax(logits.double(), dim=-1)
    tokens = out.token_ids

    # the sampled token's logprob under the raw (unscaled, unfiltered) model distribution
    assert out.logprobs.dtype == torch.float32 and out.logprobs.shape == (rows,)
    assert torch.allclose(out.logprobs.double(), raw.gather(1, tokens[:, None]).squeeze(1), atol=1e-5, rtol=0)

    # rank: 1 + number of tokens strictly more likely (no ties among random floats)
    position = (raw.argsort(dim=-1, descending=True) == tokens[:, None]).nonzero()[:, 1] + 1
    assert torch.equal(out.ranks, position)
    greedy_rows = torch.tensor(temps) == 0
    assert torch.all(out.ranks[greedy_rows] == 1)
    assert (out.ranks > 1).any()  # sampling does pick non-argmax tokens

    # top-k: sorted descending, the true k best, ids matching their logprobs
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == (rows, k) and out.top_logprobs.shape == (rows, k)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    ref_lp, ref_ids = raw.topk(k, dim=-1)
    assert torch.equal(out.top_ids, ref_ids)
    assert torch.allclose(out.top_logprobs.double(), ref_lp, atol=1e-5, rtol=0)
    assert torch.equal(out.top_ids[:, 0], logits.argmax(-1))


def test_no_top_logprobs_when_not_asked() -> None:
    torch.manual_seed(71)
    logits = torch.randn(8, 16)
    out = sample(logits, make_batch(8, 16, num_logprobs=0))
    assert out.top_ids is None and out.top_logprobs is None
    assert out.ranks.shape == (8,) and torch.all(out.ranks >= 1)
    assert torch.all(out.logprobs <= 0)


def test_logprobs_of_greedy_rows_are_the_max() -> None:
    torch.manual_seed(72)
    logits = torch.randn(16, 100) * 5
    out = sample(logits, make_batch(16, 100, temperature=0.0, num_logprobs=1))
    expected = torch.log_softmax(logits, -1).max(-1).values
    assert torch.allclose(out.logprobs, expected, atol=1e-6, rtol=0)
    assert out.top_ids is not None and torch.equal(out.top_ids[:, 0], out.token_ids)
    assert math.isclose(float(out.top_logprobs[0, 0]), float(out.logprobs[0]), abs_tol=1e-6)  # type: ignore[index]
