"""The deployment's failover as a client sees it, over a scripted replica (no Ray): a resumed
sample's text is the text it would have had without the failure (characters split across tokens,
stop strings held back or straddling the resume point), a request that fails wherever it runs
fails with the reason instead of taking replica after replica down, a seed the engine's
generators cannot take is refused at submission, and a vanishing temperature is greedy."""

from __future__ import annotations

import itertools
import queue
import threading
from types import SimpleNamespace

import pytest

from moecluster.cluster.autoscale.window import LatencyWindow
from moecluster.cluster.deployment import Deployment
from moecluster.text.tokenizer import load_tokenizer
from moecluster.workers.engine.output_processor import SeqOutputState
from moecluster.workers.engine.outputs import CompletionOutput, RequestOutput
from moecluster.workers.engine.request_limits import RequestLimits
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.engine.sequence import Sequence

TEXT = "日本 🙂 stop here"  # byte-level BPE splits each of the first three characters over tokens


class ScriptedReplica:
    """Records submissions; the test plays the rank by calling their sinks."""

    name = "decode-0"

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.aborted: list[str] = []
        self.streams = SimpleNamespace(forget=lambda inner_id: None)

    def submit(self, inner_id, prompt_ids, params, sink, prompt=None, rank=None) -> None:  # noqa: ANN001
        self.calls.put((inner_id, list(prompt_ids), params, sink))

    def abort(self, inner_id: str) -> None:
        self.aborted.append(inner_id)


class OnePool:
    name = "decode"

    def __init__(self, replica: ScriptedReplica) -> None:
        self.replica = replica

    def named(self, name: str):  # noqa: ANN201
        return None

    def least_loaded(self):  # noqa: ANN201
        return 0, self.replica


class NoMetrics:
    def __getattr__(self, name: str):  # noqa: ANN204
        return lambda *args, **kwargs: None


def scripted_deployment(model, max_resumes: int = 3) -> tuple[Deployment, ScriptedReplica]:  # noqa: ANN001
    """A Deployment's request path over one scripted replica (its constructor would start Ray pools)."""
    dep = Deployment.__new__(Deployment)
    replica = ScriptedReplica()
    pool = OnePool(replica)
    dep.spec = SimpleNamespace(model=model, trust_remote_code=False, served_name="tiny")
    dep.max_resumes, dep._decoder, dep._decoder_lock = max_resumes, None, threading.Lock()
    dep.pools, dep.entry = {"decode": pool}, pool
    dep._lock, dep._serial = threading.Lock(), itertools.count()
    dep._streams, dep._owner, dep._held, dep._transfers = {}, {}, {}, {}
    dep._stop, dep.failovers, dep.metrics, dep.tags = threading.Event(), 0, NoMetrics(), {}
    dep.window = LatencyWindow()
    dep.limits = [RequestLimits(max_model_len=256, vocab_size=1024, capacity_tokens=4096, max_num_seqs=8)]
    return dep, replica


def play(tokenizer, params: SamplingParams, prompt_len: int, tokens: list[int], sink, inner: str,  # noqa: ANN001
         replica: ScriptedReplica) -> None:
    """What an engine sends for these tokens: its own output state from an empty detokenizer."""
    seq = Sequence(inner, 0, [0] * prompt_len, prompt_len, params, prompt_len + params.max_tokens, 0)
    state = SeqOutputState(seq, tokenizer, frozenset())
    for k, token in enumerate(tokens):
        if inner in replica.aborted:
            return
        text, reason, why = state.on_token(token, prompt_len + k + 1)
        sink(RequestOutput(inner, None, [], [CompletionOutput(0, text, [token], finish_reason=reason, stop_reason=why)],
                           finished=reason is not None))
        if reason is not None:
            return


def collect(got: queue.SimpleQueue) -> tuple[str, list[int], str | None, object]:
    text, tokens = [], []
    while True:
        item = got.get(timeout=10)
        assert not isinstance(item, BaseException), item
        for o in item.outputs:
            text.append(o.text)
            tokens += o.token_ids
            reason, why = o.finish_reason, o.stop_reason
        if item.finished:
            return "".join(text), tokens, reason, why


@pytest.mark.parametrize("stop", [None, "stop"])
def test_resumed_sample_text_is_as_if_nothing_failed(tiny_checkpoint, stop) -> None:
    ckpt = tiny_checkpoint(num_layers=2)
    tokenizer = load_tokenizer(ckpt)
    tokens = tokenizer.encode(TEXT, add_special_tokens=False)
    params = SamplingParams(temperature=0.0, max_tokens=len(tokens), stop=[stop] if stop else [])
    prompt = [5, 6, 7]
    want_text = TEXT.split("stop")[0] if stop else TEXT
    want_tokens = tokens[: tokens.index(tokenizer.encode("p", add_special_tokens=False)[0]) + 1] if stop else tokens
    for k in range(1, len(want_tokens)):  # fail after every possible token
        dep, replica = scripted_deployment(ckpt)
        got: queue.SimpleQueue = queue.SimpleQueue()
        dep.submit("r", prompt, params, got.put)
        inner, _, p, sink = replica.calls.get(timeout=10)
        play(tokenizer, p, len(prompt), tokens[:k], sink, inner, replica)
        sink(RuntimeError("replica decode-0 failed: rank 0 actor is gone (ActorDiedError)"))
        inner2, prompt2, p2, sink2 = replica.calls.get(timeout=10)
        assert prompt2 == prompt + tokens[:k] and p2.max_tokens == len(tokens) - k
        play(tokenizer, p2, len(prompt2), tokens[k:], sink2, inner2, replica)
        text, out_tokens, reason, why = collect(got)
        assert (text, out_tokens) == (want_text, want_tokens), f"failed after {k} tokens"
        assert (reason, why) == (("stop", "stop") if stop else ("length", None))
        if stop:  # a stop string straddling the resume point is the driver's to find: it ends that inner request
            straddles = tokens.index(tokenizer.encode(" s", add_special_tokens=False)[0]) < k
            assert (inner2 in replica.aborted) == straddles, f"failed after {k} tokens"
        assert dep.num_open() == 0 and dep.failovers == 1


def test_request_that_fails_everywhere_gives_up_with_the_reason(tiny_checkpoint) -> None:
    dep, replica = scripted_deployment(tiny_checkpoint(num_layers=2), max_resumes=3)
    got: queue.SimpleQueue = queue.SimpleQueue()
    dep.submit("poison", [5, 6, 7], SamplingParams(max_tokens=8), got.put)
    for _ in range(4):  # the first placement and three resumes, each taking its replica down
        _, _, _, sink = replica.calls.get(timeout=10)
        sink(RuntimeError("replica decode-0 failed: rank 0: ValueError('boom')"))
    error = got.get(timeout=10)
    assert isinstance(error, RuntimeError) and "failed on 4 replicas" in str(error) and "boom" in str(error)
    with pytest.raises(queue.Empty):
        replica.calls.get(timeout=0.5)  # not placed again
    assert dep.num_open() == 0 and dep.failovers == 3


def test_seed_outside_64_bits_is_refused_before_it_reaches_an_engine(tiny_checkpoint) -> None:
    dep, replica = scripted_deployment(tiny_checkpoint(num_layers=2))
    for seed in (2**63, 2**70, -(2**63) - 1):
        with pytest.raises(ValueError, match=r"^seed: must be a 64-bit signed integer"):
            dep.submit("s", [5, 6], SamplingParams(seed=seed, n=4), lambda item: None)
    dep.submit("ok", [5, 6], SamplingParams(seed=2**63 - 1, n=4), lambda item: None)
    assert replica.calls.get(timeout=10)[0].startswith("ok#")


def test_vanishing_temperature_is_greedy(tiny_checkpoint) -> None:
    """1e-38 would overflow the scaled logits to inf (NaN probabilities: token 0 every time)."""
    dep, replica = scripted_deployment(tiny_checkpoint(num_layers=2))
    for i, (temperature, want) in enumerate([(1e-38, 0.0), (1e-6, 0.0), (1e-5, 1e-5), (0.7, 0.7), (0.0, 0.0)]):
        dep.submit(f"t{i}", [5, 6], SamplingParams(temperature=temperature), lambda item: None)
        assert replica.calls.get(timeout=10)[2].temperature == want
