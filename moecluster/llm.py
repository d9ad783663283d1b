"""The offline API, mirroring vLLM's: `LLM(model=DIR).generate(prompts, sampling_params)`."""

from __future__ import annotations

import queue
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moecluster.workers.engine.async_engine import AsyncEngine
from moecluster.workers.engine.engine_config import EngineConfig, build_engine
from moecluster.workers.engine.ep_group import EPGroup
from moecluster.workers.engine.outputs import CompletionOutput, RequestOutput
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.text.tokenizer import load_tokenizer

PromptType = str | dict[str, Any]
_PROMPT_KEYS = frozenset({"prompt_token_ids", "prompt"})


class LLM:
    """Load a DeepSeek-V3 / Kimi K2 checkpoint and generate from it in this process.

    Options are the fields of `EngineConfig`: dtype ("auto" | "float32" | "bfloat16" | "float16"),
    device, block_size, num_kv_blocks / kv_cache_memory_bytes / gpu_memory_utilization,
    max_model_len, max_num_seqs, max_num_batched_tokens, enable_chunked_prefill,
    enable_prefix_caching, trust_remote_code, seed.
    """

    def __init__(self, model: str | Path, **options: Any) -> None:
        self.config = EngineConfig(model=Path(model), **options)
        self.engine: AsyncEngine | EPGroup
        if self.config.expert_parallel_size > 1:
            if self.config.disaggregate:
                raise NotImplementedError("disaggregate=True with expert_parallel_size > 1 is not implemented yet")
            self.tokenizer = load_tokenizer(self.config.tokenizer or self.config.model,
                                            trust_remote_code=self.config.trust_remote_code)
            self.engine = EPGroup(self.config, self.config.expert_parallel_size)
        else:
            core, self.tokenizer = build_engine(self.config)
            self.engine = AsyncEngine(core)
        self._next_id = 0

    @property
    def model(self) -> Any:
        if not isinstance(self.engine, AsyncEngine):
            raise AttributeError("with expert_parallel_size > 1 the model lives in the rank processes")
        return self.engine.core.runner.model

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None and not sys.is_finalizing():  # at exit, atexit handlers did it
            engine.shutdown(timeout=1.0)

    def get_tokenizer(self) -> Any:
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """prompts: strings or {"prompt_token_ids": [...]} dicts; one RequestOutput per prompt, in order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, Sequence):
            raise ValueError(f"prompts must be a string, a dict or a list of them, got {type(prompts).__name__}")
        prompts = list(prompts)
        # None (not an empty list, which is a list of the wrong length) means the defaults
        params = SamplingParams() if sampling_params is None else sampling_params
        if isinstance(params, SamplingParams):
            per_prompt = [params] * len(prompts)
        elif isinstance(params, Sequence) and not isinstance(params, str):
            per_prompt = list(params)
        else:
            raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got {type(params).__name__}")
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} sampling params for {len(prompts)} prompts")
        wrong = [type(p).__name__ for p in per_prompt if not isinstance(p, SamplingParams)]
        if wrong:
            raise ValueError(f"sampling_params must be a SamplingParams or a list of them, got a {wrong[0]} in it")
        tokenized = [self._tokenize(p) for p in prompts]
        for (_, ids), p in zip(tokenized, per_prompt):
            self.engine.check(ids, p)  # refuse the whole batch before anything runs
        deltas: queue.SimpleQueue[RequestOutput | BaseException] = queue.SimpleQueue()
        results: dict[str, RequestOutput] = {}
        for (text, ids), p in zip(tokenized, per_prompt):
            request_id = f"offline-{self._next_id}"
            self._next_id += 1
            results[request_id] = RequestOutput(
                request_id, text, ids,
                [CompletionOutput(i, "", [], 0.0, [] if p.logprobs is not None else None) for i in range(p.n)],
            )
            self.engine.submit(request_id, ids, p, deltas.put, prompt=text)
        pending = len(results)
        while pending:
            delta = deltas.get()
            if isinstance(delta, BaseException):
                raise RuntimeError("the engine failed while generating") from delta
            _merge(results[delta.request_id], delta)
            pending -= delta.finished
        return list(results.values())

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            unknown = sorted(map(str, prompt.keys() - _PROMPT_KEYS))
            if unknown:  # e.g. vLLM's multi_modal_data: refused, not silently dropped
                raise ValueError(f"unsupported prompt keys {unknown}: a dict prompt takes only 'prompt_token_ids' "
                                 "and an optional 'prompt' (its text)")
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt_token_ids must be a list of ints")
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise ValueError(f"a dict prompt's 'prompt' must be its text (a string), got {type(text).__name__}")
            return text, list(ids)
        raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")


def _merge(total: RequestOutput, delta: RequestOutput) -> None:
    for d in delta.outputs:
        c = total.outputs[d.index]
        c.text += d.text
        c.token_ids += d.token_ids
        c.cumulative_logprob = (c.cumulative_logprob or 0.0) + (d.cumulative_logprob or 0.0)
        if c.logprobs is not None and d.logprobs:
            c.logprobs += d.logprobs
        if d.finish_reason is not None:
            c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
    total.finished = total.finished or delta.finished
