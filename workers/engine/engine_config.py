"""One replica's engine settings, validated on construction, and the builder that applies them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from moecluster.workers.engine.block_manager import BlockManager
from moecluster.workers.engine.cuda_graphs import DecodeGraphs, graphable
from moecluster.workers.engine.disaggregated import DisaggregatedCore
from moecluster.workers.engine.engine_core import EngineCore, Role
from moecluster.workers.engine.kv_cache import activation_bytes, allocate_kv_cache, bytes_per_block
from moecluster.workers.engine.model_runner import ModelRunner
from moecluster.workers.engine.scheduler import Scheduler, SchedulerConfig
from moecluster.workers.config import ModelConfig
from moecluster.workers.engine.expert_parallel import ExpertParallel
from moecluster.workers.model_loader import load_model
from moecluster.text.tokenizer import Tokenizer, load_tokenizer
from moecluster.workers.transfer.kv_transfer import InProcessTransfer, KVTransfer

log = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on the CPU; on a GPU a fraction of free memory


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    model: Path
    dtype: str = "auto"
    # "random": weights drawn on the device in the config's formats (benchmarks of full-size
    # shapes without a checkpoint); "safetensors": read from the checkpoint directory.
    load_format: Literal["safetensors", "random"] = "safetensors"
    device: str | None = None  # default: cuda when available
    tokenizer: Path | None = None
    trust_remote_code: bool = False
    seed: int = 0
    block_size: int = Field(64, ge=1, le=1024)
    num_kv_blocks: int | None = Field(None, ge=1)
    kv_cache_memory_bytes: int | None = Field(None, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    max_model_len: int | None = Field(None, ge=2)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)  # default 8192, or max_model_len without chunking
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    # Split into a prefill engine and a decode engine (each its own model copy and cache) joined by
    # an in-process KV transfer: the single-process form of prefill/decode disaggregation.
    disaggregate: bool = False
    # Between pools on Ray (a prefill pool handing samples to a decode pool): "object_store" (host
    # memory through Ray's object store) or "p2p" (a point-to-point group per rank pair: NCCL
    # between GPUs, gloo on CPUs).
    kv_transfer: Literal["object_store", "p2p"] = "object_store"
    # Ranks of one expert-parallel group, run as local processes (gloo on the CPU, NCCL on GPUs);
    # attention is data-parallel across them.
    expert_parallel_size: int = Field(1, ge=1)
    # EPLB: extra expert slots for replicas of hot experts (over the whole group), and how often
    # (in steps) the group rebalances online from the tokens its experts received (None: on request).
    eplb_redundant_slots: int = Field(0, ge=0)
    eplb_interval_steps: int | None = Field(None, ge=1)
    # CUDA graphs of decode steps for batches up to this many sequences (capped at max_num_seqs;
    # 0: every step runs eagerly). GPU only; not on a prefill-only engine. 512, vLLM's largest
    # capture size: at 512 streams K2-Thinking's slice on one H200 decoded 12.2k tok/s
    # with graphs to 256 (its steps of 378 sequences eager) and 18.3k with graphs to 512
    # (docs/performance.md, session 17).
    cuda_graph_max_batch: int = Field(512, ge=0)
    # Asynchronous scheduling: a decode step replayed from a graph is launched before the host
    # reads the samples of the step before it, so the host's work for one step (outputs,
    # scheduling, the next launch) runs while the GPU computes. Outputs reach callers one step later.
    async_scheduling: bool = True
    # FP8 routed experts run W8A8 in the decode graphs (activations quantized to e4m3 per 128
    # values, as prefill-sized batches do by default, and as vLLM and SGLang serve DeepSeek-V3);
    # else W8A16. Faster on an H200 (9-12% of the experts' time; a served DeepSeek-V3 slice's
    # decode +7.6%), within 2% either way on an H100; changes bf16 numerics slightly. fp32
    # activations: no effect.
    decode_experts_w8a8: bool = True
    # FP8 dense linears (attention projections, dense MLPs, shared experts) run W8A8 in the decode
    # graphs from 16 rows: faster than W8A16 on an H100 and an H200 at 16-64 rows (a DeepSeek-V3
    # decode step's linears 0.50 ms against 0.92 on an H200). Same numerics note as above.
    decode_linears_w8a8: bool = True

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def build_engine(cfg: EngineConfig) -> tuple[EngineCore | DisaggregatedCore, Tokenizer]:
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    if not cfg.disaggregate:
        return build_core(cfg, tokenizer), tokenizer
    transfer = InProcessTransfer()
    prefill = build_core(cfg, tokenizer, "prefill", transfer)
    decode = build_core(cfg, tokenizer, "decode", transfer)
    return DisaggregatedCore(prefill, decode), tokenizer


def build_core(
    cfg: EngineConfig,
    tokenizer: Tokenizer,
    role: Role = "both",
    transfer: KVTransfer | None = None,
    ep: ExpertParallel | None = None,
) -> EngineCore:
    """One engine: model (this rank's experts when `ep` is given), paged cache sized from the
    budget, scheduler, runner."""
    torch.manual_seed(cfg.seed)
    device = cfg.resolved_device()
    expert_ids = dispatcher = None
    if ep is not None:
        expert_ids, dispatcher = ep.experts_and_dispatcher(ModelConfig.from_dir(cfg.model), device)
    model = load_model(cfg.model, cfg.dtype, device, expert_ids, dispatcher, load_format=cfg.load_format, seed=cfg.seed)
    mcfg = model.cfg
    max_model_len = cfg.max_model_len or mcfg.max_position_embeddings
    if max_model_len > mcfg.max_position_embeddings:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {mcfg.max_position_embeddings}"
        )
    num_blocks = cfg.num_kv_blocks
    batched = cfg.max_num_batched_tokens or (8192 if cfg.enable_chunked_prefill else max_model_len)
    # decode graphs need one scratch cache block for their padding rows, past the managed ones
    graphs = device.type == "cuda" and cfg.cuda_graph_max_batch > 0 and role != "prefill" and graphable(model)
    if num_blocks is None:
        budget = cfg.kv_cache_memory_bytes or _default_kv_budget(device, cfg.gpu_memory_utilization)
        if cfg.kv_cache_memory_bytes is None and device.type == "cuda":  # room for a full step's activations
            budget -= activation_bytes(mcfg, batched, model.dtype, context=max_model_len)
        if budget < bytes_per_block(mcfg, cfg.block_size, model.dtype):
            raise ValueError(f"no GPU memory left for the KV cache after the weights and the activations of "
                             f"{batched}-token steps: lower max_num_batched_tokens or raise the memory fraction")
        num_blocks = max(1, budget // bytes_per_block(mcfg, cfg.block_size, model.dtype) - int(graphs))
        if num_blocks * cfg.block_size < max_model_len:  # requests longer than the cache are refused by name
            log.warning("the KV cache holds %d tokens, fewer than max_model_len %d: longer requests are refused; "
                        "lower max_model_len or max_num_batched_tokens, or raise the memory fraction "
                        "(`moecluster plan` sizes the cache the same way)", num_blocks * cfg.block_size, max_model_len)
    scheduler = Scheduler(
        SchedulerConfig(max_model_len, cfg.max_num_seqs, batched, cfg.enable_chunked_prefill),
        BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching),
    )
    kv_caches = allocate_kv_cache(mcfg, num_blocks + int(graphs), cfg.block_size, model.dtype, device)
    decode_graphs = None
    if graphs:
        decode_graphs = DecodeGraphs(model, kv_caches, cfg.block_size, min(cfg.cuda_graph_max_batch, cfg.max_num_seqs),
                                     max_model_len, scratch_block=num_blocks, experts_w8a8=cfg.decode_experts_w8a8,
                                     linears_w8a8=cfg.decode_linears_w8a8)
        decode_graphs.capture()
    runner = ModelRunner(model, kv_caches, cfg.block_size, decode_graphs)
    eos = mcfg.eos_token_ids or ((tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ())
    return EngineCore(runner, scheduler, tokenizer, eos, role, transfer, async_scheduling=cfg.async_scheduling)


def _default_kv_budget(device: torch.device, utilization: float) -> int:
    if device.type != "cuda":
        return CPU_KV_CACHE_BYTES
    free, total = torch.cuda.mem_get_info(device)
    return max(0, int(free - (1 - utilization) * total))
