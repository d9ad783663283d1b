"""Batch generation for the offline API: admit, prefill together, decode together, stop.

A request is admitted when its prompt and its whole generation budget fit in free cache blocks
(reserved up front, so nothing is ever preempted), and its prompt fits the step's token budget.
Admitted prompts of different lengths are prefilled in one step; then every running sequence
decodes one token per step until it stops. Finished sequences free their blocks at once, which
admits more of the waiting ones.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass

import torch

from moecluster.workers.engine.block_allocator import BlockAllocator
from moecluster.workers.engine.model_runner import ModelRunner
from moecluster.workers.engine.outputs import CompletionOutput, Logprob
from moecluster.workers.engine.sampler import SamplerOutput
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.engine.sequence import Sequence


class PromptTooLong(ValueError):
    pass


@dataclass(frozen=True)
class EngineLimits:
    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class OfflineEngine:
    def __init__(
        self,
        runner: ModelRunner,
        allocator: BlockAllocator,
        limits: EngineLimits,
        eos_token_ids: Seq[int],
        decode: Callable[[list[int], bool], str],
    ) -> None:
        self.runner, self.allocator, self.limits = runner, allocator, limits
        self.eos = set(eos_token_ids)
        self.decode = decode  # (token ids, skip_special_tokens) -> text
        self._next_id = 0

    def check(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Validate one request before it costs anything; returns its total length budget."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.limits.max_model_len:
            raise PromptTooLong(
                f"prompt of {n} tokens does not fit max_model_len {self.limits.max_model_len} with room to generate"
            )
        if any(not 0 <= t < self.runner.vocab_size for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.runner.vocab_size})")
        total = self.limits.max_model_len if params.max_tokens is None else min(n + params.max_tokens, self.limits.max_model_len)
        if self.allocator.blocks_for(total) * params.n > self.allocator.num_blocks:
            raise PromptTooLong(
                f"prompt of {n} tokens plus up to {total - n} new tokens (x{params.n} samples) needs more than "
                f"the {self.allocator.num_blocks * self.allocator.block_size} tokens the KV cache holds"
            )
        return total

    def generate(self, requests: list[tuple[list[int], SamplingParams]]) -> list[list[CompletionOutput]]:
        """Run every request to completion; returns, per request, its n completions."""
        waiting: deque[Sequence] = deque()
        for r, (prompt, params) in enumerate(requests):
            total = self.check(prompt, params)
            for i in range(params.n):
                waiting.append(self._new_sequence(r, i, prompt, params, total))
        done: list[Sequence] = []
        running: list[Sequence] = []
        while waiting or running:
            admitted = self._admit(waiting, len(running))
            batch = admitted if admitted else running
            out = self.runner.step(batch)
            self._append(batch, out)
            running = [s for s in running + admitted if not s.finished]
            for seq in batch:
                if seq.finished:
                    self.allocator.free(seq.blocks)
                    seq.blocks = []
                    done.append(seq)
        results: list[list[CompletionOutput]] = [[] for _ in requests]
        for seq in sorted(done, key=lambda s: (s.request_index, s.sample_index)):
            results[seq.request_index].append(self._completion(seq))
        return results

    def _new_sequence(self, r: int, i: int, prompt: list[int], params: SamplingParams, total: int) -> Sequence:
        gen = None
        if params.seed is not None:
            gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
        self._next_id += 1
        return Sequence(self._next_id, r, i, list(prompt), len(prompt), params, total, gen)

    def _admit(self, waiting: deque[Sequence], num_running: int) -> list[Sequence]:
        admitted: list[Sequence] = []
        tokens = 0
        while waiting and num_running + len(admitted) < self.limits.max_num_seqs:
            seq = waiting[0]
            need = self.allocator.blocks_for(seq.max_len)
            over_budget = admitted and tokens + seq.prompt_len > self.limits.max_num_batched_tokens
            if over_budget or need > self.allocator.num_free:
                break
            seq.blocks = self.allocator.allocate(need)
            tokens += seq.prompt_len
            admitted.append(waiting.popleft())
        return admitted

    def _append(self, seqs: list[Sequence], out: SamplerOutput) -> None:
        token_ids = out.token_ids.tolist()
        chosen_lp, ranks = out.logprobs.tolist(), out.ranks.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lp = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for row, seq in enumerate(seqs):
            token = token_ids[row]
            seq.token_ids.append(token)
            seq.cumulative_logprob += chosen_lp[row]
            k = seq.params.logprobs
            if k is not None:
                entry = {token: Logprob(chosen_lp[row], ranks[row])}
                if k and top_ids is not None and top_lp is not None:
                    for rank, (tid, lp) in enumerate(zip(top_ids[row][:k], top_lp[row][:k]), start=1):
                        entry.setdefault(tid, Logprob(lp, rank))
                seq.logprobs.append(entry)
            self._check_stop(seq)

    def _check_stop(self, seq: Sequence) -> None:
        last, params = seq.token_ids[-1], seq.params
        if not params.ignore_eos and last in self.eos:
            seq.finish_reason = "stop"
        elif last in params.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", last
        elif params.stop and (hit := self._stop_string(seq)) is not None:
            seq.finish_reason, seq.stop_reason = "stop", hit
        elif len(seq.token_ids) >= seq.max_len:
            seq.finish_reason = "length"

    def _stop_string(self, seq: Sequence) -> str | None:
        text = self.decode(seq.output_ids, seq.params.skip_special_tokens)
        hits = [(text.find(s), s) for s in seq.params.stop if s in text]
        return min(hits)[1] if hits else None

    def _completion(self, seq: Sequence) -> CompletionOutput:
        text = self.decode(seq.output_ids, seq.params.skip_special_tokens)
        if isinstance(seq.stop_reason, str):
            cut = text.find(seq.stop_reason)
            text = text[: cut + len(seq.stop_reason)] if seq.params.include_stop_str_in_output else text[:cut]
        return CompletionOutput(
            index=seq.sample_index,
            text=text,
            token_ids=seq.output_ids,
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=seq.logprobs if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )
