"""The oracle: Hugging Face transformers' DeepseekV3ForCausalLM on the same checkpoint.

Quantized checkpoints are compared on their dequantized weights: `dequantized_copy` writes a
float32 copy (FP8 blocks times their scales, INT4 nibbles times their group scales, computed
here from the format's definition, independently of the model's own code) that transformers
loads as a plain checkpoint. Kimi K2's `kimi_k2` model_type is the DeepSeek-V3 architecture,
so its config is loaded as a DeepseekV3Config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def _dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    rows = scale_inv.repeat_interleave(block[0], dim=0)[: w.shape[0]]
    full = rows.repeat_interleave(block[1], dim=1)[:, : w.shape[1]]
    return w.float() * full


def _dequant_int4(packed: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    words = packed.to(torch.int64) & 0xFFFFFFFF  # (out, in / 8) as unsigned 32-bit
    nibbles = [(words >> (4 * k)) & 0xF for k in range(8)]  # element 8j + k sits at bits 4k of word j
    q = torch.stack(nibbles, dim=-1).reshape(packed.shape[0], -1) - 8  # (out, in)
    return q.float() * scale.float().repeat_interleave(group, dim=1)


def dequantized_copy(src: Path, dst: Path) -> Path:
    """A float32, unquantized copy of the checkpoint in src, with a config transformers accepts."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    quant = cfg.pop("quantization_config", None)
    cfg["model_type"] = "deepseek_v3"
    cfg["torch_dtype"] = "float32"
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            raw = {name: f.get_tensor(name) for name in f.keys()}
        for name, t in raw.items():
            if name.endswith(("weight_scale_inv", "weight_scale", "weight_shape")):
                continue
            if name.endswith(".weight_packed"):
                base = name[: -len("_packed")]
                tensors[base] = _dequant_int4(t, raw[base + "_scale"], quant["config_groups"]["group_0"]["weights"]["group_size"])
            elif t.dtype == torch.float8_e4m3fn:
                tensors[name] = _dequant_fp8(t, raw[name + "_scale_inv"], quant["weight_block_size"])
            else:
                tensors[name] = t.float()
    save_file(tensors, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def load_reference(src: Path, tmp: Path) -> torch.nn.Module:
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(dequantized_copy(src, tmp), dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def greedy_reference(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy continuation with transformers' own cache; returns tokens and their logprobs."""
    ids = torch.tensor([prompt])
    out = model(input_ids=ids, use_cache=True)
    tokens, logprobs = [], []
    for _ in range(new_tokens):
        lp = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        tok = int(lp.argmax())
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logprobs


def assert_greedy_matches(reference: torch.nn.Module, prompts: list[list[int]], outputs: list, new_tokens: int,
                          logprob_tol: float) -> None:
    """Each output's first sample: greedy tokens equal to the reference's, their logprobs within
    `logprob_tol` (the engine must have been asked for logprobs)."""
    import pytest

    for prompt, out in zip(prompts, outputs):
        ref_tokens, ref_logprobs = greedy_reference(reference, prompt, new_tokens)
        got = out.outputs[0] if hasattr(out, "outputs") else out
        assert got.token_ids == ref_tokens, f"prompt of {len(prompt)} tokens diverged"
        ours = [step[tok].logprob for step, tok in zip(got.logprobs, got.token_ids)]
        assert ours == pytest.approx(ref_logprobs, abs=logprob_tol)
