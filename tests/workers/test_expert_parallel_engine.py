"""LLM(expert_parallel_size=N): N rank processes over gloo, attention data-parallel, experts split.

Greedy tokens must equal EP=1 for bf16-format and INT4 checkpoints, with a batch that leaves the
ranks unequal numbers of requests, including a rank with none for some steps.
"""

from __future__ import annotations

import pytest

from moecluster import LLM, SamplingParams


@pytest.mark.parametrize(("world", "quant"), [(2, "none"), (4, "int4")])
def test_ep_greedy_equals_single_process(tiny_checkpoint, world: int, quant: str) -> None:
    ckpt = tiny_checkpoint(num_layers=2, quant=quant)
    # 5 requests over `world` ranks: unequal shares; different max_tokens so ranks run dry at
    # different steps and keep stepping empty batches while the others decode.
    prompts = [{"prompt_token_ids": [(13 * i + j) % 900 + 2 for j in range(4 + 9 * i)]} for i in range(5)]
    params = [SamplingParams(temperature=0.0, max_tokens=3 + 4 * i, ignore_eos=True) for i in range(5)]
    options = dict(dtype="float32", device="cpu", block_size=16, num_kv_blocks=48)
    want = [o.outputs[0].token_ids for o in LLM(ckpt, **options).generate(prompts, params)]
    ep = LLM(ckpt, expert_parallel_size=world, **options)
    try:
        got = [o.outputs[0].token_ids for o in ep.generate(prompts, params)]
        assert got == want
        again = [o.outputs[0].token_ids for o in ep.generate(prompts[:1], params[:1])]  # one busy rank, the rest idle
        assert again == want[:1]
        with pytest.raises(ValueError, match="empty"):
            ep.generate([{"prompt_token_ids": []}])
    finally:
        ep.engine.shutdown()


def test_eplb_rebalance_mid_generation_keeps_answers(tiny_checkpoint) -> None:
    """Rebalance every 4 steps while requests decode: weights move between ranks, replicas of hot
    experts appear, the tokens stay the same as one process."""
    ckpt = tiny_checkpoint(num_layers=2, quant="int4")
    prompts = [{"prompt_token_ids": [(7 * i + j) % 900 + 2 for j in range(6 + 11 * i)]} for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    options = dict(dtype="float32", device="cpu", block_size=16, num_kv_blocks=48)
    want = [o.outputs[0].token_ids for o in LLM(ckpt, **options).generate(prompts, params)]
    ep = LLM(ckpt, expert_parallel_size=2, eplb_redundant_slots=4, eplb_interval_steps=4, **options)
    try:
        got = [o.outputs[0].token_ids for o in ep.generate(prompts, params)]
        assert got == want
        reports = [r for _, r in ep.engine.eplb_reports]
        assert reports and sum(r.moved_slots for r in reports) > 0
        assert all(r.balance_after <= r.balance_before + 1e-9 for r in reports)
    finally:
        ep.engine.shutdown()


def test_a_script_using_ep_exits_cleanly(tiny_checkpoint) -> None:
    """Leaving the rank processes to interpreter shutdown must not hang the program."""
    import subprocess
    import sys

    script = (
        "from moecluster import LLM, SamplingParams\n"
        f"llm = LLM({str(tiny_checkpoint(num_layers=2))!r}, dtype='float32', device='cpu', expert_parallel_size=2,"
        " num_kv_blocks=32, block_size=16)\n"
        "print(len(llm.generate(['hi'], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("3")


def test_ep_deltas_carry_the_prompt_back(tiny_checkpoint) -> None:
    """Rank processes send outputs without their prompts (`ep_rank`); the group's deltas have them
    again, as `AsyncEngine` delivers them."""
    import queue

    ep = LLM(tiny_checkpoint(num_layers=2), expert_parallel_size=2, dtype="float32", device="cpu", block_size=16,
             num_kv_blocks=48)
    try:
        deltas: queue.SimpleQueue = queue.SimpleQueue()
        ids = [5, 6, 7, 8, 9]
        ep.engine.submit("p", ids, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), deltas.put, "text")
        seen = []
        while not seen or not seen[-1].finished:
            d = deltas.get(timeout=120)
            assert not isinstance(d, BaseException), d
            seen.append(d)
        assert all(d.prompt == "text" and d.prompt_token_ids == ids for d in seen)
        assert sum(len(o.token_ids) for d in seen for o in d.outputs) == 3
    finally:
        ep.engine.shutdown()


def test_a_taken_rendezvous_port_is_retried(tiny_checkpoint, monkeypatch) -> None:
    """The rendezvous port is free when picked but may be taken before rank 0 binds it (seen in
    CI): the group starts again on another port instead of failing."""
    import socket

    from moecluster.workers.engine import ep_group

    ckpt = tiny_checkpoint(num_layers=2, quant="none")
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    picks: list[int] = []
    real = ep_group._socket

    def first_taken():  # noqa: ANN202
        s = real()
        if not picks:  # the first pick is the squatter's port
            picks.append(squatter.getsockname()[1])
            return _Named(s, picks[-1])
        picks.append(s.getsockname()[1])
        return s

    monkeypatch.setattr(ep_group, "_socket", first_taken)
    try:
        ep = LLM(ckpt, expert_parallel_size=2, dtype="float32", device="cpu", block_size=16, num_kv_blocks=16)
        try:
            out = ep.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0.0, max_tokens=2))
            assert len(out[0].outputs[0].token_ids) == 2
        finally:
            ep.engine.shutdown()
    finally:
        squatter.close()
    assert len(picks) == 2 and picks[0] != picks[1]


class _Named:
    """A socket stand-in that reports a chosen port (the one another process holds)."""

    def __init__(self, s, port: int) -> None:  # noqa: ANN001
        self._s, self._port = s, port

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", self._port)

    def __enter__(self) -> _Named:
        return self

    def __exit__(self, *exc: object) -> None:
        self._s.close()
