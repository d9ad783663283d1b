"""The deployment spec: what `moecluster serve --spec FILE` deploys, validated before anything starts.

    model: /models/deepseek-v3        # checkpoint directory (as the ranks see it)
    served_name: deepseek-v3          # the model name clients ask for (default: the directory name)
    prefill:                          # omit for colocated serving (decode replicas prefill themselves)
      replicas: 1
      ep: 8                           # EP ranks per replica (one Ray actor each)
      device: cuda                    # cuda | cpu
      gpus_per_rank: 1
    decode: {replicas: 2, ep: 8, device: cuda}
    cache: {block_size: 64, memory_fraction: 0.9}     # or num_blocks, or memory_bytes (CPU)
    engine: {max_model_len: 131072, max_num_seqs: 256, max_num_batched_tokens: 8192}
    router: {host: 0.0.0.0, grpc_port: 50051, http_port: 8000, policy: cache_aware}
    autoscaling:
      policy: slo                     # or a Python class path, module.sub:Class
      decode: {min_replicas: 1, max_replicas: 4}

Every error names the field (`decode.ep`, `router.http_port`) and the reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Policy = Literal["round_robin", "least_load", "cache_aware", "session"]
CLASS_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class SpecError(ValueError):
    """An invalid deployment spec; the message names the field and the reason."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PoolSpec(_Strict):
    """One pool of identical replicas; each replica is one expert-parallel group."""

    replicas: int = Field(1, ge=0, le=1024)
    ep: int = Field(1, ge=1, le=1024, description="EP ranks per replica")
    device: Literal["cuda", "cpu"] = "cuda"
    gpus_per_rank: int | None = Field(None, ge=0, le=8, description="default: 1 on cuda, 0 on cpu")

    @model_validator(mode="after")
    def _gpus(self) -> PoolSpec:
        if self.gpus_per_rank is None:
            object.__setattr__(self, "gpus_per_rank", 1 if self.device == "cuda" else 0)
        if self.device == "cuda" and self.gpus_per_rank != 1:
            raise ValueError(f"gpus_per_rank: must be 1 on cuda (one rank per GPU), got {self.gpus_per_rank}")
        if self.device == "cpu" and self.gpus_per_rank:
            raise ValueError("gpus_per_rank: must be 0 on cpu")
        return self


class CacheSpec(_Strict):
    block_size: int = Field(64, ge=1, le=1024)
    num_blocks: int | None = Field(None, ge=1)
    memory_fraction: float = Field(0.9, gt=0.0, le=1.0, description="GPU: fraction of memory for weights + cache")
    memory_bytes: int | None = Field(None, ge=1, description="CPU: bytes for the cache")
    enable_prefix_caching: bool = True


class EngineSpec(_Strict):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    load_format: Literal["safetensors", "random"] = Field(
        "safetensors", description="'random': no checkpoint read, weights drawn on the GPUs (benchmarks)")
    max_model_len: int | None = Field(None, ge=2)
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=1)
    enable_chunked_prefill: bool = True
    eplb_redundant_slots: int = Field(0, ge=0)
    eplb_interval_steps: int | None = Field(None, ge=1)
    kv_transfer: Literal["auto", "object_store", "p2p"] = Field(
        "auto", description="prefill -> decode KV blocks: p2p (NCCL between GPUs, gloo on CPUs) or Ray's object "
                            "store; auto: p2p on cuda, object_store on cpu")
    cuda_graph_max_batch: int = Field(
        512, ge=0, description="GPU decode steps of up to this many sequences replay CUDA graphs (0: always eager)")
    async_scheduling: bool = Field(
        True, description="launch each graph-replayed decode step before reading the previous step's samples, so "
                          "the host's scheduling and outputs overlap the GPU (outputs reach clients a step later)")
    decode_experts_w8a8: bool = Field(
        True, description="FP8 routed experts run W8A8 in decode CUDA graphs (activations quantized to e4m3 per "
                          "128 values): faster on H200-class GPUs, within 2% on H100")
    decode_linears_w8a8: bool = Field(
        True, description="FP8 dense linears (attention projections, dense MLPs, shared experts) run W8A8 in decode "
                          "CUDA graphs from 16 rows: faster than W8A16 on H100 and H200")


class RouterSpec(_Strict):
    host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)
    http_port: int = Field(8000, ge=0, le=65535)
    metrics_port: int = Field(9400, ge=0, le=65535)
    policy: Policy = "cache_aware"
    max_queue: int = Field(1024, ge=1, description="requests waiting beyond this are refused (RESOURCE_EXHAUSTED / 429)")
    # Bearer-token auth: the key comes from this environment variable (a Kubernetes Secret), never from the spec.
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    tls_cert: Path | None = None  # PEM certificate chain; TLS on both servers when set with tls_key
    tls_key: Path | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> RouterSpec:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_key: tls_cert and tls_key must be given together")
        return self

    @model_validator(mode="after")
    def _distinct_ports(self) -> RouterSpec:
        ports = [p for p in (self.grpc_port, self.http_port, self.metrics_port) if p]
        if len(set(ports)) != len(ports):
            raise ValueError(f"http_port: grpc_port, http_port and metrics_port must differ, got {ports}")
        return self


class ScaleBounds(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _order(self) -> ScaleBounds:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas: {self.min_replicas} exceeds max_replicas ({self.max_replicas})")
        return self


class SLOTargets(_Strict):
    """What the default SLO policy holds the pools to (p90 over the last interval)."""

    ttft_s: float = Field(2.0, gt=0, description="prefill pool (or colocated): time to first token")
    queue_s: float = Field(1.0, gt=0, description="prefill pool (or colocated): wait before the first step")
    itl_s: float = Field(0.1, gt=0, description="decode pool: time between tokens")
    kv_high: float = Field(0.85, gt=0, le=1, description="decode pool: KV-cache use that calls for a replica")
    kv_low: float = Field(0.3, ge=0, lt=1, description="decode pool: below this (and latencies low) a replica may go")
    low_fraction: float = Field(0.5, gt=0, lt=1, description="hysteresis: 'low' means under this fraction of a target")
    down_intervals: int = Field(3, ge=1, description="consecutive low intervals before scaling down")


class AutoscalingSpec(_Strict):
    policy: str = Field("slo", description="'slo', or a user policy as a class path module.sub:Class")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments for a user policy")
    targets: SLOTargets = SLOTargets()
    prefill: ScaleBounds | None = None
    decode: ScaleBounds | None = None
    interval_s: float = Field(10.0, gt=0)
    cooldown_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _policy(self) -> AutoscalingSpec:
        if self.policy != "slo" and not CLASS_PATH.match(self.policy):
            raise ValueError(f"policy: must be 'slo' or a class path like 'my_pkg.policies:Policy', got {self.policy!r}")
        return self


class DeploymentSpec(_Strict):
    model: Path
    served_name: str | None = None
    trust_remote_code: bool = False
    prefill: PoolSpec | None = None
    decode: PoolSpec = PoolSpec()
    cache: CacheSpec = CacheSpec()
    engine: EngineSpec = EngineSpec()
    router: RouterSpec = RouterSpec()
    autoscaling: AutoscalingSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> DeploymentSpec:
        if self.served_name is None:
            object.__setattr__(self, "served_name", self.model.name or str(self.model))
        if self.decode.replicas < 1:
            raise ValueError("decode.replicas: must be at least 1 (the decode pool serves every request)")
        if self.prefill is not None and self.prefill.replicas < 1:
            raise ValueError("prefill.replicas: must be at least 1, or omit prefill for colocated serving")
        if self.prefill is not None and self.prefill.device != self.decode.device:
            raise ValueError(f"prefill.device: {self.prefill.device} must match decode.device ({self.decode.device})")
        if self.autoscaling is not None:
            for name in ("prefill", "decode"):
                bounds, pool = getattr(self.autoscaling, name), getattr(self, name)
                if bounds is None:
                    continue
                if pool is None:
                    raise ValueError(f"autoscaling.{name}: is set but there is no {name} pool")
                if not bounds.min_replicas <= pool.replicas <= bounds.max_replicas:
                    raise ValueError(
                        f"{name}.replicas: {pool.replicas} is outside autoscaling.{name} "
                        f"[{bounds.min_replicas}, {bounds.max_replicas}]"
                    )
        return self

    @property
    def colocated(self) -> bool:
        return self.prefill is None

    def pools(self) -> dict[str, PoolSpec]:
        return {"decode": self.decode} | ({"prefill": self.prefill} if self.prefill is not None else {})

    def check_paths(self) -> None:
        """For a local deployment: the checkpoint must be where the spec says, with a config the
        model supports and (unless `engine.load_format: random`) readable safetensors holding every
        tensor its index names; checked here, before Ray starts and ranks load it."""
        if not (self.model / "config.json").is_file():
            raise SpecError(f"spec field 'model': no config.json in {self.model}")
        try:
            cfg = check_checkpoint(self.model, weights=self.engine.load_format == "safetensors")
        except ValueError as e:
            raise SpecError(f"spec field 'model': {e}") from None
        if self.engine.max_model_len is not None and self.engine.max_model_len > cfg.max_position_embeddings:
            raise SpecError(f"spec field 'engine.max_model_len': {self.engine.max_model_len} exceeds the checkpoint's "
                            f"max_position_embeddings {cfg.max_position_embeddings}")

    @classmethod
    def parse(cls, data: Any) -> DeploymentSpec:
        if not isinstance(data, dict):
            raise SpecError(f"a deployment spec must be a mapping of fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise SpecError(_describe(e)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> DeploymentSpec:
        p = Path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpecError(f"spec file {p} does not exist") from None
        except UnicodeDecodeError as e:
            raise SpecError(f"spec file {p}: not UTF-8 text (byte {e.start}); expected YAML") from None
        except OSError as e:  # a directory, no permission
            raise SpecError(f"spec file {p}: cannot read it: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise SpecError(f"spec file {p} is not valid YAML: {_yaml_problem(e)}") from None
        return cls.parse(data)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line: where and what (PyYAML's own message spans several lines with the source quoted)."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or str(error)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{where}{problem}".split())


MAX_SAFETENSORS_HEADER = 100 << 20  # as the safetensors library limits it


def check_checkpoint(model_dir: str | Path, weights: bool = True) -> Any:
    """What can be checked of a checkpoint without reading its weights: config.json is an object the
    model supports, and every safetensors file has a whole header, data that is all there, and
    every tensor that model.safetensors.index.json places in it. Returns the `ModelConfig`;
    raises ValueError (or FileNotFoundError) naming the file and the problem."""
    from moecluster.workers.config import ModelConfig

    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist" if not root.exists()
                                else f"{root} is not a directory (give the checkpoint directory)")
    config = root / "config.json"
    try:
        raw = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: no config.json (is this a Hugging Face checkpoint directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config}: not a readable JSON file ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{config}: must hold a JSON object of fields, got {type(raw).__name__}")
    try:
        cfg = ModelConfig.from_hf(raw)
    except (TypeError, AttributeError, KeyError, IndexError) as e:  # a field of an unexpected shape
        raise ValueError(f"{config}: a field has an unsupported form ({type(e).__name__}: {e})") from None
    if weights:
        _check_safetensors(root)
    return cfg


def _check_safetensors(root: Path) -> None:
    """Every shard's header whole, and every tensor the index places in a shard there. The
    name -> shard map is the loader's own (`checkpoint_files`), read after the headers are checked:
    it opens unindexed shards with safetensors, whose error on a corrupt file names no file."""
    from moecluster.workers.checkpoint.loader import INDEX_FILE, checkpoint_files

    indexed = (root / INDEX_FILE).is_file()
    if not indexed and not any(root.glob("*.safetensors")):
        raise ValueError(f"{root}: no *.safetensors files and no {INDEX_FILE} (only safetensors checkpoints "
                         "are supported; engine.load_format: random serves without weights)")
    held = {path: _safetensors_header(path) for path in sorted(root.glob("*.safetensors")) if not indexed}
    wanted: dict[Path, list[str]] = {}
    for name, path in checkpoint_files(root).items():  # CheckpointError (a ValueError): bad index, missing shard
        wanted.setdefault(path, []).append(name)
    for path, names in sorted(wanted.items()):
        have = held[path] if path in held else _safetensors_header(path)
        missing = [n for n in names if n not in have]
        if missing:
            raise ValueError(f"{path} does not hold tensor '{missing[0]}'" +
                             (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "") +
                             f", which {INDEX_FILE} places there")


def _safetensors_header(path: Path) -> set[str]:
    """The tensor names of a safetensors file, after checking its header is whole and its data
    region covers every tensor (a truncated download fails here, by name, not in a rank)."""
    bad = f"{path} is not a valid safetensors file"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{bad} ({size} bytes: too short for a header)")
            n = int.from_bytes(head, "little")
            if n > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise ValueError(f"{bad} (its header claims {n} bytes; the file has {size})")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise ValueError(f"{path} cannot be read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{bad} (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad} (its header is not a JSON object)")
    data = size - 8 - n
    names = set()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = int(info["data_offsets"][1])
        except (TypeError, KeyError, IndexError, ValueError):
            raise ValueError(f"{bad} (tensor '{name}' has no data_offsets)") from None
        if end > data:
            raise ValueError(f"{path} is truncated: tensor '{name}' ends at byte {end} of a "
                             f"{data}-byte data section (an incomplete download?)")
        names.add(name)
    return names


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        path = [str(part) for part in err["loc"]]
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error" and (m := re.match(r"^([\w.]+): (.*)$", reason, re.S)):
            path.append(m.group(1))  # a cross-field check names its field relative to where it ran
            reason = m.group(2)
        if err["type"] == "extra_forbidden":
            reason = "is not a known field"
        lines.append(f"spec field '{'.'.join(path) or '(spec)'}': {reason}")
    return "; ".join(lines)
