"""The service-time model of one replica for the autoscaling simulator: step costs, limits and
start-up delay, calibrated from `moecluster bench engine` plus documented GPU costs."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

# GPU time of one DeepSeek-V3 (FP8) replica of 8 x H200, EP 8 with DP attention; see ServiceModel.
GPU_BASE_S = 0.025
GPU_PER_SEQ_S = 25e-6
GPU_PER_PREFILL_TOKEN_S = 35e-6


@dataclass(frozen=True)
class ServiceModel:
    """How fast one replica serves. Defaults: DeepSeek-V3 (FP8) on 8 x H200 (EP 8, DP attention).

    Step time = GPU time + host time, added (the engine schedules, runs the forward, then updates,
    without overlap). GPU time (estimates, replace them with measurements when you have them):
    - `step_base_s` 25 ms: every step streams each GPU's 96 GiB of weights (`moecluster plan`) at an
      achieved ~4 TB/s, plus 58 MoE layers of all-to-all latency. Assumes batches big enough to touch
      every expert (from about 100 sequences); smaller ones read less.
    - `step_per_seq_s` 28 us: 2 x 37B active parameters = 74 GFLOP per token over 8 GPUs at ~450
      TFLOP/s achieved FP8 (21 us), attention over a few thousand tokens of latent cache (~4 us at
      replica level), plus host 3.4 us (the engine benchmark's 27 us per sequence per rank, over 8
      ranks stepping in parallel). Adding the weight reads and the compute (no roofline overlap)
      is pessimistic by up to 2x where the two are equal.
    - `step_per_prefill_token_s` 35 us: the same FLOPs per prompt token at ~265 TFLOP/s achieved
      (our fused MoE is 0.75-0.83x of a grouped GEMM at prefill sizes): ~28.5k prompt tokens/s.
      Linear in the prompt: attention's quadratic term is left out (small below ~8K tokens).
    - `prefill_chunk_tokens` 8192 per replica (1024 per rank): a full chunk adds 0.29 s to a step,
      which a colocated replica's decoding requests feel as one long inter-token gap.
    - `max_running_seqs` 2048 = 256 per rank (the engine's max_num_seqs) x 8 ranks.
    - `kv_capacity_tokens` 4.5M: `moecluster plan --model deepseek-v3 --gpu h200` gives 567,680
      latent-cache tokens per GPU (bf16, 70,272 B per token) x 8.
    - KV handoff (disaggregated): 5 ms + prompt x 70,272 B at 25 GB/s (one 200 Gb/s NIC per replica).
    - `startup_s` 120: placement group, 8 rank actors, loading 96 GiB of weights per GPU from local NVMe.
    The three step costs are `from_engine_bench(docs/results/engine-cpu.json)` with these GPU
    costs, rounded (the benchmark's host intercept fits below zero and is clipped to 0).

    Calibrate: run `moecluster bench engine` on the serving hosts and
    `ServiceModel.from_engine_bench(json, gpu_base_s=..., ...)` with GPU costs measured on the
    hardware (a decode step at a few batch sizes, a prefill chunk: the forward time alone); or fit the
    three step coefficients to logged step times of a running deployment.
    """

    gpus_per_replica: int = 8
    step_base_s: float = GPU_BASE_S
    step_per_seq_s: float = 28e-6
    step_per_prefill_token_s: float = 35e-6
    prefill_chunk_tokens: int = 8192
    max_running_seqs: int = 2048
    kv_capacity_tokens: int = 4_500_000
    kv_bytes_per_token: int = 70_272
    handoff_latency_s: float = 0.005
    handoff_bytes_per_s: float = 25e9
    startup_s: float = 120.0

    def __post_init__(self) -> None:
        positive = ("gpus_per_replica", "step_base_s", "prefill_chunk_tokens", "max_running_seqs",
                    "kv_capacity_tokens", "kv_bytes_per_token", "handoff_bytes_per_s")
        for f in fields(self):
            value = getattr(self, f.name)
            if value < 0 or (value == 0 and f.name in positive):
                raise ValueError(f"ServiceModel.{f.name}: must be {'> 0' if f.name in positive else '>= 0'}, got {value}")

    def step_s(self, decodes: int, prefill_tokens: int = 0) -> float:
        """One engine step carrying `decodes` decode tokens and `prefill_tokens` prompt tokens."""
        return self.step_base_s + self.step_per_seq_s * decodes + self.step_per_prefill_token_s * prefill_tokens

    def handoff_s(self, prompt_tokens: int) -> float:
        """Moving a prefilled prompt's KV cache from a prefill replica to a decode replica."""
        return self.handoff_latency_s + prompt_tokens * self.kv_bytes_per_token / self.handoff_bytes_per_s

    @classmethod
    def from_engine_bench(
        cls,
        path: str | Path,
        ranks_per_replica: int = 8,
        gpu_base_s: float = GPU_BASE_S,
        gpu_per_seq_s: float = GPU_PER_SEQ_S,
        gpu_per_prefill_token_s: float = GPU_PER_PREFILL_TOKEN_S,
        **overrides: Any,
    ) -> ServiceModel:
        """Host cost per step from a `moecluster bench engine` JSON, plus the given GPU costs.

        The benchmark times one rank's engine step without the forward (`total` = scheduler +
        batch prepare, mean ms). A least-squares line through the decode cases gives the host
        time per step = intercept (clipped at 0) + slope x sequences on the rank; the prefill-heavy
        case, less that line at its running count, gives the host time per prompt token. Ranks step
        in parallel, so per replica the per-sequence and per-token costs divide by the ranks."""
        data = json.loads(Path(path).read_text())
        if data.get("benchmark") != "engine":
            raise ValueError(f"{path}: not a `moecluster bench engine` result (benchmark: {data.get('benchmark')!r})")
        cases = data["scheduler"]["cases"]
        decode = [(c["running_per_step"], c["parts_ms"]["total"]["mean"] / 1e3) for c in cases if c["case"] == "decode"]
        if len(decode) < 2:
            raise ValueError(f"{path}: needs at least two decode cases to fit the per-sequence cost")
        mx, my = sum(x for x, _ in decode) / len(decode), sum(y for _, y in decode) / len(decode)
        slope = sum((x - mx) * (y - my) for x, y in decode) / sum((x - mx) ** 2 for x, _ in decode)
        intercept = max(0.0, my - slope * mx)
        per_token = 0.0
        for c in cases:
            if c["case"] == "prefill-heavy":
                prompt_tokens = c["tokens_per_step"] - c["running"]
                extra = c["parts_ms"]["total"]["mean"] / 1e3 - (intercept + slope * c["running"])
                per_token = max(0.0, extra / prompt_tokens)
        fitted = dict(
            gpus_per_replica=ranks_per_replica,  # one rank per GPU
            step_base_s=gpu_base_s + intercept,
            step_per_seq_s=gpu_per_seq_s + slope / ranks_per_replica,
            step_per_prefill_token_s=gpu_per_prefill_token_s + per_token / ranks_per_replica,
        )
        return cls(**(fitted | overrides))


def load_service_model(path: str | Path) -> ServiceModel:
    """A JSON file: an engine benchmark result (calibrated with the default GPU costs), or an object
    of `ServiceModel` fields (missing ones keep their defaults)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"service model file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not text
        raise ValueError(f"service model file {p}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"service model file {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"service model file {p}: expected a JSON object")
    if data.get("benchmark") == "engine":
        return ServiceModel.from_engine_bench(p)
    known = {f.name for f in fields(ServiceModel)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"service model file {p}: unknown fields {unknown}; known: {sorted(known)}")
    try:
        return ServiceModel(**data)
    except TypeError as e:  # a field of the wrong type (a string for a number, ...)
        raise ValueError(f"service model file {p}: every field must be a number: {e}") from None
