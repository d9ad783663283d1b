"""The baseline of `moecluster bench serve`: transformers' `DeepseekV3ForCausalLM`, eager.

The same model shape (the checkpoint directory's config.json; Kimi K2's `kimi_k2` is this
architecture) in bf16 with `attn_implementation="eager"` (and the eager experts loop where the
transformers version offers a choice), random weights from transformers' own initialisation on
the device. A batch of `concurrency` random prompts is prefilled (in micro-batches whose eager
attention scores fit in memory, their caches joined), then `steps` greedy decode steps are timed
one by one. The context is cut down when the non-absorbed cache (keys and values of every head)
of `concurrency` sequences would not fit next to the weights; the result records the context used.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from moecluster.cluster.stats import percentile

SCORES_BUDGET = 2 << 30  # bytes of eager attention scores per prefill micro-batch


def build(model_dir: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    raw = json.loads((Path(model_dir) / "config.json").read_text())
    raw.pop("quantization_config", None)
    raw["model_type"] = "deepseek_v3"
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    config = DeepseekV3Config(**{k: v for k, v in raw.items() if k != "model_type"})
    config._attn_implementation = "eager"
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = DeepseekV3ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _join(caches: list[Any]) -> Any:
    """One DynamicCache holding the micro-batches' caches side by side (batch dim 0)."""
    from transformers import DynamicCache

    if len(caches) == 1:
        return caches[0]
    joined = DynamicCache()
    for layer in range(len(caches[0].layers)):
        keys = torch.cat([c.layers[layer].keys for c in caches])
        values = torch.cat([c.layers[layer].values for c in caches])
        joined.update(keys, values, layer)
    return joined


@torch.no_grad()
def decode_baseline(
    model_dir: Path, concurrency: int, context: int, steps: int, device: torch.device,
    dtype: torch.dtype = torch.bfloat16, seed: int = 0,
) -> dict[str, Any]:
    model = build(model_dir, dtype, device)
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = cfg.num_hidden_layers * cfg.num_attention_heads * (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim) * torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fits = int(0.6 * free / (concurrency * per_token))
        context = min(context, fits // 16 * 16)
        if context < 16:
            raise RuntimeError(f"transformers baseline: no room for a cache of {concurrency} sequences next to "
                               f"{weights / 2**30:.1f} GiB of weights")
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, cfg.vocab_size, (concurrency, context), generator=g).to(device)
    micro = max(1, min(concurrency, SCORES_BUDGET // (cfg.num_attention_heads * context * context * 6)))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    caches, last = [], []
    for chunk in prompts.split(micro):
        out = model(input_ids=chunk, use_cache=True)
        caches.append(out.past_key_values)
        last.append(out.logits[:, -1].argmax(-1))
        del out
    cache = _join(caches)
    del caches
    sync()
    prefill_s = time.perf_counter() - start
    token = torch.cat(last)[:, None]
    step_ms = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1)[:, None]
        cache = out.past_key_values
        sync()
        step_ms.append((time.perf_counter() - t0) * 1e3)
    median = percentile(step_ms, 0.5)
    result = {
        "implementation": f"transformers {_version()} DeepseekV3ForCausalLM, eager attention"
                          + (", eager experts" if hasattr(cfg, "_experts_implementation") else ""),
        "dtype": str(dtype).removeprefix("torch."), "weights_gib": weights / 2**30, "concurrency": concurrency,
        "context": context, "prefill_micro_batch": micro, "prefill_s": prefill_s, "steps": steps,
        "step_ms_p50": median, "decode_tok_s": concurrency / (median * 1e-3),
    }
    del model, cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _version() -> str:
    import transformers

    return transformers.__version__
