"""`moecluster make-slice`: a few layers of a full-size model, served with random weights.

A slice keeps every published shape of DeepSeek-V3, Kimi K2 or K2-Thinking (hidden 7168, 128 or
64 MLA heads, 256 or 384 routed experts of width 2048, the full vocabulary, FP8 or INT4 formats)
and cuts only the depth: `dense_layers` dense layers, then MoE layers up to `layers`. The
directory holds `config.json`, `generation_config.json` and a tokenizer, no weights: serve it
with `engine.load_format: random` and every rank draws its weights on its GPU in the formats the
config declares (`workers/checkpoint/random_weights.py`), so kernels, memory and the data plane
see what the full model gives them per layer.

`routed_experts` keeps fewer routed experts (top-k, groups and every width unchanged): the rank
proxy of expert parallelism on one GPU. A model with E / N experts at B sequences gives each expert
the rows that one of N EP ranks gives its E / N experts at B sequences a rank (B x k / (E / N) under
uniform routing, as the rank then runs the N x B gathered tokens) and holds what such a rank holds:
every attention, dense, shared and embedding weight and its share of experts. So its memory, its
cache capacity and its decode step are an EP rank's at full depth, less the dispatch collectives.
(With limited groups, as DeepSeek-V3's, an expert count that is not a power of two runs the torch
gate, not the fused one a rank of 256 experts runs; 32 and 16, for EP=8 and 16, are powers of two.)

The tokenizer is the toy BPE of `make-tiny` (trained on a built-in corpus) padded with filler
tokens up to the published vocabulary size: every id the model can emit decodes to text, and
prompts given as token ids may use the whole range.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moecluster.cluster.plan.presets import PRESETS
from moecluster.workers.checkpoint.tiny_tokenizer import special_token_ids, write_generation_config, write_tiny_tokenizer
from moecluster.workers.config import ModelConfig

TRAINED_VOCAB = 2048  # the BPE part of the tokenizer; the rest of the vocabulary is fillers


def slice_config(preset: str, layers: int, dense_layers: int = 1, routed_experts: int | None = None) -> dict[str, Any]:
    """The preset's config.json with `layers` decoder layers, the first `dense_layers` dense, and
    `routed_experts` routed experts (default: the published count)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model {preset!r}: choose one of {', '.join(PRESETS)}")
    if not 0 <= dense_layers < layers:
        raise ValueError(f"a slice needs 0 <= dense_layers < layers (at least one MoE layer), got {dense_layers}, {layers}")
    full = PRESETS[preset]
    if layers > full["num_hidden_layers"]:
        raise ValueError(f"{preset} has {full['num_hidden_layers']} layers; a slice of {layers} is not a slice")
    raw = {**full, "num_hidden_layers": layers, "first_k_dense_replace": dense_layers, "num_nextn_predict_layers": 0,
           "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
           "initializer_range": 0.02, "use_cache": True}
    if routed_experts is not None:
        _check_routed_experts(preset, full, routed_experts)
        raw["n_routed_experts"] = routed_experts
    ModelConfig.from_hf(raw)  # only write what the loader accepts
    return raw


def _check_routed_experts(preset: str, full: dict[str, Any], n: int) -> None:
    """Fewer experts must still route as the preset does: top-k of them, in whole groups of at least two."""
    top_k, groups = full["num_experts_per_tok"], full.get("n_group") or 1
    if n > full["n_routed_experts"] or n < top_k:
        raise ValueError(f"routed_experts {n}: {preset} routes each token to {top_k} of {full['n_routed_experts']} "
                         f"experts; keep between {top_k} and {full['n_routed_experts']}")
    if n % groups or n // groups < 2:
        raise ValueError(f"routed_experts {n}: {preset} splits its experts into {groups} groups (scored by their "
                         f"top two); use a multiple of {groups} with at least 2 a group")
    if (full.get("topk_group") or groups) * (n // groups) < top_k:
        raise ValueError(f"routed_experts {n}: the {full.get('topk_group')} groups a token may use would hold fewer "
                         f"than its {top_k} experts")


def make_slice(out_dir: str | Path, preset: str = "deepseek-v3", layers: int = 4, dense_layers: int = 1,
               routed_experts: int | None = None) -> Path:
    """Write config, generation config and a full-vocabulary tokenizer to out_dir."""
    out = Path(out_dir)
    raw = slice_config(preset, layers, dense_layers, routed_experts)
    out.mkdir(parents=True, exist_ok=True)
    arch = raw["model_type"].replace("_", "-")  # deepseek-v3 or kimi-k2 (K2-Thinking's too)
    write_tiny_tokenizer(out, arch, TRAINED_VOCAB, model_max_length=raw["max_position_embeddings"])
    pad_tokenizer(out / "tokenizer.json", raw["vocab_size"])  # moves the special tokens: read their ids after
    raw["bos_token_id"], raw["eos_token_id"] = special_token_ids(out)
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    write_generation_config(out, raw["bos_token_id"], raw["eos_token_id"])
    return out


def pad_tokenizer(path: Path, vocab_size: int) -> None:
    """Grow the tokenizer to exactly `vocab_size` ids: special tokens outside the BPE vocabulary
    move to the top ids (where the published tokenizers keep theirs; the tokenizers library
    numbers such tokens after the model's vocabulary anyway), and filler tokens (byte-level
    " ~<id>" strings, never produced by encoding: they have no merges) take the ids between."""
    tok = json.loads(path.read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    if len(vocab) != max(vocab.values()) + 1:
        raise ValueError(f"{path}: the BPE vocabulary's ids are not contiguous")
    added = [t for t in tok["added_tokens"] if t["content"] not in vocab]
    first_top = vocab_size - len(added)
    if first_top < len(vocab):
        raise ValueError(f"{path}: {len(vocab)} BPE tokens + {len(added)} added ones exceed vocab_size {vocab_size}")
    moved = {t["id"]: first_top + j for j, t in enumerate(added)}
    for t in added:
        t["id"] = moved[t["id"]]
    for spec in (tok.get("post_processor") or {}).get("special_tokens", {}).values():
        spec["ids"] = [moved.get(i, i) for i in spec["ids"]]
    for i in range(len(vocab), first_top):
        token = f"\u0120~{i}"  # byte-level form of " ~<i>"
        if token in vocab:
            raise ValueError(f"{path}: filler token {token!r} collides with a trained token")
        vocab[token] = i
    path.write_text(json.dumps(tok, ensure_ascii=False) + "\n", encoding="utf-8")
