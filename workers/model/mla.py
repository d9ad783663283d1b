"""Multi-head Latent Attention (DeepSeek-V2/V3), over a paged latent cache.

Per token the cache keeps c_kv (kv_lora_rank values, after kv_a_layernorm) and the rotated
shared rope key k_pe (qk_rope_head_dim values): 576 values for DeepSeek-V3 and Kimi K2.

Two paths compute the same attention:
- naive (prefill chunks, and the oracle): expand the context's latents into per-head keys and
  values with kv_b_proj, then ordinary causal attention; a context longer than `context_chunk`
  is expanded a segment at a time and the segments' outputs are merged by their log-sum-exps, so
  a 128K-token context never holds every head's keys and values at once (that would take 17 GB
  for DeepSeek-V3's 128 heads, reserved before the cache is sized);
- absorbed (decode): fold W_UK into the query and W_UV into the output, so attention runs
  directly over the latent cache. W_UK / W_UV are split out of kv_b_proj once, at load time.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from moecluster.kernels.mla_decode import mla_decode, mla_decode_reference
from moecluster.workers.config import ModelConfig
from moecluster.workers.model.attention_metadata import AttentionMetadata
from moecluster.workers.model.rope import RotaryEmbedding
from moecluster.workers.model.weights import Linear, RMSNorm, Slot, scheme_for

# context tokens whose per-head keys and values a prefill chunk's attention expands at once
# (`workers/engine/kv_cache.activation_bytes` reserves memory for this many)
CONTEXT_CHUNK = 16384


def segmented(rows: int, context: int, chunk: int) -> bool:
    """Whether a prefill chunk of `rows` over `context` tokens expands its context in segments of
    `chunk` (else all of it at once; the chunk's own rows are always expanded together)."""
    return context > max(chunk, rows)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, rope: RotaryEmbedding, dtype: torch.dtype) -> None:
        super().__init__()
        self.prefix, self.rope = prefix, rope
        self.heads, self.nope, self.rope_dim = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.kv_lora = cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        self.context_chunk = CONTEXT_CHUNK  # context tokens expanded per head at once in a prefill chunk
        q_out = self.heads * cfg.qk_head_dim

        def linear(name: str, i: int, o: int) -> Linear:
            return Linear(i, o, scheme_for(cfg.quant, f"{prefix}.{name}"), dtype)

        self.q_lora = cfg.q_lora_rank
        if self.q_lora is None:
            self.q_proj = linear("q_proj", cfg.hidden_size, q_out)
        else:
            self.q_a_proj = linear("q_a_proj", cfg.hidden_size, self.q_lora)
            self.q_a_layernorm = RMSNorm(self.q_lora, 1e-6, dtype)
            self.q_b_proj = linear("q_b_proj", self.q_lora, q_out)
        self.kv_a_proj_with_mqa = linear("kv_a_proj_with_mqa", cfg.hidden_size, cfg.latent_dim)
        self.kv_a_layernorm = RMSNorm(self.kv_lora, 1e-6, dtype)
        self.kv_b_proj = linear("kv_b_proj", self.kv_lora, self.heads * (self.nope + self.v_dim))
        self.o_proj = linear("o_proj", self.heads * self.v_dim, cfg.hidden_size)
        # Absorbed weights, filled by prepare() after loading.
        self.register_buffer("w_uk", torch.empty(self.heads, self.nope, self.kv_lora, dtype=dtype))  # (H, nope, c)
        self.register_buffer("w_uv", torch.empty(self.heads, self.v_dim, self.kv_lora, dtype=dtype))  # (H, v, c)

    def slots(self) -> Iterator[Slot]:
        p = self.prefix
        if self.q_lora is None:
            yield from self.q_proj.slots(f"{p}.q_proj")
        else:
            yield from self.q_a_proj.slots(f"{p}.q_a_proj")
            yield from self.q_a_layernorm.slots(f"{p}.q_a_layernorm")
            yield from self.q_b_proj.slots(f"{p}.q_b_proj")
        yield from self.kv_a_proj_with_mqa.slots(f"{p}.kv_a_proj_with_mqa")
        yield from self.kv_a_layernorm.slots(f"{p}.kv_a_layernorm")
        yield from self.kv_b_proj.slots(f"{p}.kv_b_proj")
        yield from self.o_proj.slots(f"{p}.o_proj")

    @torch.no_grad()
    def prepare(self) -> None:
        """Split kv_b_proj into W_UK and W_UV for both paths; done once after loading."""
        w = self.kv_b_proj.dequantize(self.w_uk.dtype).view(self.heads, self.nope + self.v_dim, self.kv_lora)
        self.w_uk.copy_(w[:, : self.nope])
        self.w_uv.copy_(w[:, self.nope :])

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (tokens, hidden) -> q_nope (tokens, H, nope), q_pe (tokens, H, rope), latent (tokens, c + rope)."""
        q = self.q_proj(x) if self.q_lora is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(x.shape[0], self.heads, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        q_pe = self.rope.rotate(q_pe, cos, sin)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora, self.rope_dim], dim=-1)
        k_pe = self.rope.rotate(k_pe.unsqueeze(1), cos, sin).squeeze(1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1)
        return q_nope, q_pe, latent

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        """x (tokens, hidden); kv_cache (blocks, block_size, c + rope) of this layer -> (tokens, hidden)."""
        q_nope, q_pe, latent = self.project(x, cos, sin)
        kv_cache.view(-1, kv_cache.shape[-1])[meta.slot_mapping] = latent.to(kv_cache.dtype)
        if x.shape[0] and not meta.prefill_seqs:  # decodes only: row i is sequence i's one token
            out = self.attend_absorbed(q_nope, q_pe, kv_cache, meta.block_tables, meta.seq_lens, meta.mla_plans)
            return self.o_proj(out.reshape(x.shape[0], self.heads * self.v_dim))
        out = x.new_empty(x.shape[0], self.heads, self.v_dim)  # (tokens, H, v)
        for seq in meta.prefill_seqs:
            rows = slice(meta.query_starts[seq], meta.query_starts[seq] + meta.query_lens[seq])
            context = gather_context(kv_cache, meta.block_tables[seq], int(meta.seq_lens[seq]))
            out[rows] = self.attend_naive(q_nope[rows], q_pe[rows], context)
        if meta.decode_rows.numel():
            rows = meta.decode_rows
            tables, lens = meta.decode_view
            out[rows] = self.attend_absorbed(q_nope[rows], q_pe[rows], kv_cache, tables, lens, meta.mla_plans)
        return self.o_proj(out.view(x.shape[0], self.heads * self.v_dim))

    def attend_naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The last q rows of one sequence against its whole context (ctx, c + rope) -> (q, H, v).

        Keys and values are expanded per head (prefill is compute bound: the expanded form is the
        cheaper one) and attention runs through `scaled_dot_product_attention` with a
        bottom-right causal mask (a chunk's rows are the context's last rows): flash or
        memory-efficient kernels on GPUs, so no (H, q, ctx) score tensor is ever materialized.
        Past `context_chunk` tokens, the context before the rows goes in segments of that many
        (every row sees all of them), then the rows' own keys (causal), each with its log-sum-exp,
        and the outputs are merged in fp32."""
        n_q, n_ctx = q_nope.shape[0], context.shape[0]
        if n_q == 0:  # (the CPU's flash kernel divides by the row count)
            return q_nope.new_empty(0, self.heads, self.v_dim)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # (H, q, nope + rope)
        if not segmented(n_q, n_ctx, self.context_chunk):
            k, v = self._expand(context.to(q.dtype))
            mask = causal_lower_right(n_q, n_ctx)
            out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=self.scale)[0]
            return out[..., : self.v_dim].transpose(0, 1)  # (q, H, v)
        past = n_ctx - n_q
        acc = q.new_zeros(self.heads, n_q, self.v_dim, dtype=torch.float32)  # merged output so far
        lse = q.new_full((self.heads, n_q), float("-inf"), dtype=torch.float32)  # its log-sum-exp
        bounds = [(s, min(s + self.context_chunk, past), False) for s in range(0, past, self.context_chunk)]
        for start, end, causal in bounds + [(past, n_ctx, True)]:  # the rows' own keys: a square, causal
            k, v = self._expand(context[start:end].to(q.dtype))
            part, part_lse = attention_with_lse(q, k, v, causal, self.scale)
            del k, v
            merged = torch.logaddexp(lse, part_lse)
            acc.mul_(torch.exp(lse - merged)[..., None])  # in place: one fp32 temporary beside acc
            acc.add_(part[..., : self.v_dim].float().mul_(torch.exp(part_lse - merged)[..., None]))
            lse = merged
        return acc.to(q.dtype).transpose(0, 1)  # (q, H, v)

    def _expand(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent rows (ctx, c + rope) -> per-head keys (H, ctx, nope + rope) and values padded to
        the keys' head dim (H, ctx, nope + rope; the fused kernels want one head dim)."""
        c_kv, k_pe = context.split([self.kv_lora, self.rope_dim], dim=-1)
        k_nope = torch.einsum("lc,hnc->hln", c_kv, self.w_uk)  # (H, ctx, nope)
        v = torch.einsum("lc,hvc->hlv", c_kv, self.w_uv)  # (H, ctx, v)
        k = torch.cat([k_nope, k_pe.unsqueeze(0).expand(self.heads, -1, -1)], dim=-1)  # (H, ctx, nope + rope)
        del k_nope  # the expanded keys and values are the peak of a long prefill: hold one copy each
        if v.shape[-1] < k.shape[-1]:
            v = F.pad(v, (0, k.shape[-1] - v.shape[-1]))
        return k, v

    def attend_absorbed(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        kv_cache: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        plans: dict | None = None,
    ) -> torch.Tensor:
        """One new token per sequence: (batch, H, nope), (batch, H, rope) -> (batch, H, v). plans: the
        step's dict of decode work plans (`mla_decode`), shared by the layers."""
        q = q_nope.new_empty(q_nope.shape[0], self.heads, self.kv_lora + self.rope_dim)  # (batch, H, c + rope)
        # absorbed W_UK straight into q's first c columns (a batched GEMM per head; no concatenation pass)
        torch.bmm(q_nope.transpose(0, 1), self.w_uk, out=q[..., : self.kv_lora].transpose(0, 1))  # (H, batch, c)
        q[..., self.kv_lora :] = q_pe
        if q.is_cuda:  # the Triton kernels on GPUs
            o_latent = mla_decode(q, kv_cache, block_tables, seq_lens, self.scale, self.kv_lora, plans=plans)
        else:
            o_latent = mla_decode_reference(q, kv_cache, block_tables, seq_lens, self.scale, self.kv_lora)
        return torch.einsum("bhc,hvc->bhv", o_latent, self.w_uv)  # (batch, H, v)


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of (H, q, d) over (H, ctx, d) keys and values (causal: top-left, for a square)
    -> the output (H, q, d) and each row's log-sum-exp of its scaled scores (H, q) in fp32: the
    fused kernels' own (flash for 16-bit on GPUs, memory-efficient for fp32 and where flash cannot
    run: before sm80, flash disabled, a head dim it does not take; the CPU's flash)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and torch.backends.cuda.flash_sdp_enabled():
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
                q[None], k[None], v[None], 0.0, causal, False, scale=scale)[:2]
            return out[0], lse[0, :, : q.shape[1]].float()
        except RuntimeError as e:  # this GPU or shape has no flash kernel: the memory-efficient one below
            if isinstance(e, torch.OutOfMemoryError):
                raise
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q[None], k[None], v[None], None, True, 0.0, causal, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None], k[None], v[None], 0.0, causal, scale=scale)[:2]
    return out[0], lse[0, :, : q.shape[1]].float()  # the memory-efficient kernel pads the rows of its lse


def gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` latent entries, (length, c + rope), from its block table."""
    block_size = kv_cache.shape[1]
    n_blocks = -(-length // block_size)
    return kv_cache[block_table[:n_blocks].long()].reshape(-1, kv_cache.shape[-1])[:length]
