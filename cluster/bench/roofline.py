"""Decode rooflines for `moecluster bench serve`: bytes a decode step must touch over the copy
bandwidth measured in the same run, and the MoE layer's own step timed against its roofline.

A decode step of one rank reads, per layer, the attention weights it uses in absorbed form
(q_a, q_b, kv_a, W_UK, W_UV, o_proj), the dense MLP or the MoE gate + shared expert, the routed
experts its tokens reach, and its sequences' latent cache; plus the LM head. Bytes come from the
model built on the meta device with the rank's experts, so they follow the config's formats
(FP8 weights stay e4m3 on GPUs, INT4 experts stay packed). With C sequences spread over an EP
group of `ep` ranks (data-parallel attention), each rank decodes C / ep sequences and holds
E / ep experts; the experts a step reaches are E_local * (1 - (1 - k/E)^C) in expectation under
uniform routing (random weights route nearly uniformly).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from moecluster.cluster.stats import percentile
from moecluster.workers.config import ModelConfig
from moecluster.workers.engine.kv_cache import bytes_per_block

ATTENTION_WEIGHTS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj")


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.buffers()) + sum(
        p.numel() * p.element_size() for p in module.parameters())


def _moe_bytes(moe: torch.nn.Module) -> tuple[int, float]:
    """An MoE layer's bytes read whatever the batch (router weights in fp32, shared experts) and
    one routed expert's bytes, as stored."""
    fixed = moe.gate_weight.numel() * 4 + (_bytes(moe.shared_experts) if moe.shared_experts is not None else 0)
    return fixed, _bytes(moe.experts) / max(1, len(moe.experts.expert_ids))


def layer_bytes(cfg: ModelConfig, dtype: torch.dtype, local_experts: int) -> dict[str, float]:
    """Bytes per decode step that do not depend on the batch: attention, dense / shared MLPs,
    gates, LM head (summed over layers), and one routed expert's bytes (gate, up, down)."""
    from moecluster.workers.model.deepseek import DeepseekV3Model
    from moecluster.workers.model.moe import MoE

    with torch.device("meta"):
        model = DeepseekV3Model(cfg, dtype, expert_ids=list(range(local_experts)))
    attention = dense = expert = 0.0
    for layer in model.layers:
        attn = layer.self_attn
        attention += sum(_bytes(getattr(attn, n)) for n in ATTENTION_WEIGHTS if hasattr(attn, n))
        attention += attn.w_uk.numel() * attn.w_uk.element_size() + attn.w_uv.numel() * attn.w_uv.element_size()
        attention += _bytes(attn.q_a_layernorm) if hasattr(attn, "q_a_layernorm") else 0
        if isinstance(layer.mlp, MoE):
            fixed, expert = _moe_bytes(layer.mlp)
            dense += fixed
        else:
            dense += _bytes(layer.mlp)
    head = _bytes(model.lm_head)
    return {"attention": attention, "dense_and_shared": dense, "lm_head": head, "per_expert": expert}


def expected_experts_hit(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts that `tokens` tokens reach, each choosing top_k of num_experts uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def decode_step_roofline(
    cfg: ModelConfig, dtype: torch.dtype, concurrency: int, context: int, ep: int, copy_gbs: float,
    parts: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Per-rank bytes of one decode step and the time reading them at `copy_gbs` takes (`parts`:
    `layer_bytes(cfg, dtype, n_routed_experts // ep)`, when the caller has it already)."""
    parts = parts or layer_bytes(cfg, dtype, cfg.n_routed_experts // ep)
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    hit = expected_experts_hit(cfg.n_routed_experts, cfg.num_experts_per_tok, concurrency) / ep
    seqs = -(-concurrency // ep)
    kv = seqs * context * bytes_per_block(cfg, 1, dtype)  # every layer's latent rows
    experts = hit * parts["per_expert"] * moe_layers
    total = parts["attention"] + parts["dense_and_shared"] + parts["lm_head"] + experts + kv
    return {
        "concurrency": concurrency, "context": context, "ep": ep, "sequences_per_rank": seqs,
        "experts_hit_per_layer_per_rank": hit,
        "bytes": {"attention": parts["attention"], "dense_and_shared": parts["dense_and_shared"],
                  "lm_head": parts["lm_head"], "routed_experts": experts, "kv_cache": kv, "total": total},
        "copy_gbs": copy_gbs, "roofline_ms": total / (copy_gbs * 1e9) * 1e3,
    }


def copy_bandwidth_gbs(device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _time_ms(fn, device: torch.device, warmup: int = 3, iters: int = 20) -> float:  # noqa: ANN001
    """Median wall time of fn in ms (synchronized on GPUs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return percentile(times, 0.5)


@torch.no_grad()
def moe_layer_step(cfg: ModelConfig, dtype: torch.dtype, tokens: int, copy_gbs: float, device: torch.device,
                   seed: int = 0, experts_w8a8: bool = False, linears_w8a8: bool = False) -> dict[str, Any]:
    """One MoE layer (all experts on this device, random weights in the config's formats, the
    kernels the engine uses) on a decode batch of `tokens`: median time against the bytes it must
    read (gate, shared expert, the experts this batch reaches) over the copy bandwidth. On a GPU
    `ms` times replays of the layer captured in a CUDA graph, as decode steps run it (EP=1);
    `eager_ms` the same layer launched op by op. FP8 weights run the modes the decode graphs
    run them in (`w8a16_only` with the engine's `decode_experts_w8a8` / `decode_linears_w8a8`)."""
    from moecluster.kernels.fp8_quant import w8a16_only
    from moecluster.workers.checkpoint.random_weights import fill_random
    from moecluster.workers.model.deepseek import prepare_gpu
    from moecluster.workers.model.moe import MoE

    layer = cfg.first_k_dense_replace
    with torch.device(device):
        moe = MoE(cfg, f"model.layers.{layer}.mlp", dtype)
    fill_random(moe.slots(), seed)
    fixed, per_expert = _moe_bytes(moe)  # as stored (the kernel layouts are the same size)
    if device.type == "cuda":
        prepare_gpu(moe, dtype)  # what the engine does to a loaded model
    x = torch.randn(tokens, cfg.hidden_size, generator=torch.Generator(device).manual_seed(seed), device=device,
                    dtype=dtype)
    with w8a16_only(experts_w8a8=experts_w8a8, linears_w8a8=linears_w8a8):  # compiled here, before any capture
        moe.expert_counts.zero_()
        moe(x)
        hit = int((moe.expert_counts > 0).sum())
        eager_ms = ms = _time_ms(lambda: moe(x), device, warmup=3, iters=20)
        if device.type == "cuda":  # as decode steps run it: replayed from a CUDA graph, no launch gaps
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                moe(x)
            ms = _time_ms(graph.replay, device, warmup=3, iters=20)
    total = fixed + hit * per_expert + 2 * x.numel() * x.element_size()
    roofline_ms = total / (copy_gbs * 1e9) * 1e3
    return {"tokens": tokens, "experts_hit": hit, "bytes": total, "ms": ms, "eager_ms": eager_ms,
            "roofline_ms": roofline_ms, "vs_roofline": ms / roofline_ms}
