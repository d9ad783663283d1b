"""Build the model for a checkpoint directory and load its weights."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from moecluster.router.experts.dispatch import Dispatcher
from moecluster.workers.checkpoint.loader import load_slots
from moecluster.workers.checkpoint.random_weights import fill_random
from moecluster.workers.config import ModelConfig
from moecluster.workers.model.deepseek import DeepseekV3Model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOAD_FORMATS = ("safetensors", "random")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def resolve_dtype(dtype: str | torch.dtype, cfg: ModelConfig) -> torch.dtype:
    """'auto' takes the checkpoint's torch_dtype; otherwise one of float32, bfloat16, float16."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported (float32, bfloat16, float16)")
        return dtype
    name = cfg.torch_dtype if dtype == "auto" else DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use 'auto', 'float32', 'bfloat16' or 'float16'")
    return DTYPES[name]


def load_model(
    model_dir: str | Path,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    expert_ids: list[int] | None = None,
    dispatcher: Dispatcher | None = None,
    progress: bool | None = None,
    load_format: str = "safetensors",
    seed: int = 0,
) -> DeepseekV3Model:
    """Read config.json, build the stack on `device` and fill it from the checkpoint, or with
    random weights in the checkpoint's formats (`load_format="random"`: config.json alone)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not supported: use one of {', '.join(LOAD_FORMATS)}")
    cfg = ModelConfig.from_dir(model_dir)
    torch_dtype = resolve_dtype(dtype, cfg)
    start = time.perf_counter()
    with torch.device(device):
        model = DeepseekV3Model(cfg, torch_dtype, expert_ids, dispatcher)
    if load_format == "random":
        written = fill_random(model.slots(), seed)
        log.info("random weights (seed %d): %.2f GiB on %s", seed, written / 2**30, device)
    else:
        load_slots(model_dir, model.slots(), progress=progress)
    model.prepare()
    model.eval()
    log.info("loaded %s (%s, %s) in %.1fs", model_dir, cfg.model_type, torch_dtype, time.perf_counter() - start)
    return model
