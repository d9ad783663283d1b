"""The offline API, mirroring vLLM's: `LLM(model=DIR).generate(prompts, sampling_params)`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from moecluster.workers.engine.block_allocator import BlockAllocator
from moecluster.workers.engine.kv_cache import allocate_kv_cache, bytes_per_block
from moecluster.workers.engine.model_runner import ModelRunner
from moecluster.workers.engine.offline_engine import EngineLimits, OfflineEngine
from moecluster.workers.engine.outputs import RequestOutput
from moecluster.workers.engine.sampling_params import SamplingParams
from moecluster.workers.model_loader import load_model
from moecluster.workers.tokenizer import load_tokenizer

PromptType = str | dict[str, Any]
CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on the CPU; on a GPU a fraction of free memory


class LLM:
    """Load a DeepSeek-V3 / Kimi K2 checkpoint and generate from it in this process.

    Options: dtype ("auto" | "float32" | "bfloat16" | "float16"), device (default: cuda when
    available), block_size (tokens per cache block), num_kv_blocks or kv_cache_memory_bytes
    (CPU) / gpu_memory_utilization (CUDA), max_model_len, max_num_seqs, max_num_batched_tokens,
    trust_remote_code (for tokenizers shipped as custom code), seed.
    """

    def __init__(
        self,
        model: str | Path,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        tokenizer: str | Path | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        block_size: int = 64,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
    ) -> None:
        torch.manual_seed(seed)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = load_tokenizer(tokenizer or model, trust_remote_code=trust_remote_code)
        self.model = load_model(model, dtype, self.device)
        cfg = self.model.cfg
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                f"{cfg.max_position_embeddings}"
            )
        per_block = bytes_per_block(cfg, block_size, self.model.dtype)
        if num_kv_blocks is None:
            budget = kv_cache_memory_bytes or self._default_kv_budget(gpu_memory_utilization)
            num_kv_blocks = max(1, budget // per_block)
        kv_caches = allocate_kv_cache(cfg, num_kv_blocks, block_size, self.model.dtype, self.device)
        runner = ModelRunner(self.model, kv_caches, block_size)
        eos = cfg.eos_token_ids or ((self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ())
        self.engine = OfflineEngine(
            runner,
            BlockAllocator(num_kv_blocks, block_size),
            EngineLimits(self.max_model_len, max_num_seqs, max_num_batched_tokens),
            eos,
            lambda ids, skip: self.tokenizer.decode(ids, skip_special_tokens=skip),
        )

    def _default_kv_budget(self, utilization: float) -> int:
        if self.device.type != "cuda":
            return CPU_KV_CACHE_BYTES
        free, total = torch.cuda.mem_get_info(self.device)
        return max(0, int(free - (1 - utilization) * total))

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
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        texts, token_ids = zip(*(self._tokenize(p) for p in prompts)) if prompts else ((), ())
        completions = self.engine.generate(list(zip(token_ids, params)))
        return [
            RequestOutput(str(i), text, ids, outputs, finished=True)
            for i, (text, ids, outputs) in enumerate(zip(texts, token_ids, completions))
        ]

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError("prompt_token_ids must be a list of ints")
            return prompt.get("prompt"), list(ids)
        raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")
