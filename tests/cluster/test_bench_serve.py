"""`moecluster bench serve` end to end on the CPU (toy checkpoint), random weights, slices, rooflines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moecluster.cluster.bench.roofline import decode_step_roofline, expected_experts_hit, layer_bytes
from moecluster.cluster.bench.serve import ServeBenchConfig, main, summarize_level
from moecluster.cluster.bench.serve_load import RequestRecord
from moecluster.cluster.bench.slice_model import make_slice, slice_config
from moecluster.cluster.cli import main as cli
from moecluster.text.tokenizer import load_tokenizer
from moecluster.workers.config import ModelConfig
from moecluster.workers.model_loader import load_model


def test_bench_serve_on_cpu_measures_every_level(local_ray, tiny_checkpoint, tmp_path) -> None:
    ckpt = tiny_checkpoint()
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    cfg = ServeBenchConfig(model=ckpt, load_format="safetensors", device="cpu", dtype="float32",
                           mixes=((24, 6), (40, 3)), concurrency=(1, 3), waves=2, baseline_concurrency=3,
                           baseline_steps=3, client_procs=2)
    result = main(cfg, out, png)
    saved = json.loads(out.read_text())
    assert png.stat().st_size > 10_000
    assert [(r["kind"], r["input_len"], r["concurrency"]) for r in saved["levels"]] == [
        ("prefill", 24, 3), ("serve", 24, 1), ("serve", 24, 3), ("prefill", 40, 3), ("serve", 40, 1), ("serve", 40, 3)]
    for row in saved["levels"]:
        assert row["errors"] == 0
        requests = row["concurrency"] * (1 if row["kind"] == "prefill" else 2)
        assert row["requests"] == requests
        assert row["output_tokens"] == requests * row["output_len"]  # ignore_eos: exactly the asked length
        assert row["input_tokens"] == requests * row["input_len"]
        assert row["ttft_ms_p50"] > 0 and row["input_tok_s_per_gpu"] > 0
        assert row["client_processes"] == min(2, row["concurrency"])  # the streams split over two clients
        phases = row["rank_step_ms"]  # where the decode ranks' steps spent their time, this level only
        assert {"schedule", "sync", "launch", "gpu_wait", "outputs", "step"} <= set(phases), phases
        assert phases["step"] >= phases["launch"] > 0
        if row["kind"] == "serve":
            assert 0 < row["itl_ms_p50"] <= row["itl_ms_p99"]
            assert row["roofline_step_ms"] > 0 and row["step_vs_roofline"] > 0
            # measured in the decode-only steps, at the rows they ran: at most the level's streams
            rows = row["rank_decode_rows_mean"]
            assert 1 <= rows <= row["concurrency"]
            assert row["rank_decode_tok_s_per_gpu"] > 0
            assert row["rank_decode_graph_share"] == 0  # no graph is captured on the CPU: every step ran eagerly
        else:
            assert row["rank_decode_tok_s_per_gpu"] is None and row["rank_decode_rows_mean"] is None
    assert saved["startup_s"] > 0 and saved["warmup_s"] > 0
    kv = saved["kv_cache"]
    assert kv["decode_ranks"] == 1 and kv["tokens_per_rank"] > 0
    assert kv["sequences_per_rank_at_128k"] == kv["tokens_per_rank"] // 131072
    assert saved["summary"]["best_decode_tok_s_per_node"] == saved["summary"]["best_decode_tok_s_per_gpu"]  # one GPU
    assert saved["copy_gbs"] > 0
    assert [m["tokens"] for m in saved["moe_layer"]] == [1, 3]
    assert all(1 <= m["experts_hit"] <= 16 and m["ms"] > 0 for m in saved["moe_layer"])
    base = saved["baseline"]
    assert base["concurrency"] == 3 and base["context"] == 24 and base["decode_tok_s"] > 0
    assert result.summary["speedup_vs_transformers"] == pytest.approx(
        result.summary["decode_tok_s_per_gpu"] / base["decode_tok_s"])
    at3 = next(r for r in saved["levels"] if r["kind"] == "serve" and r["input_len"] == 24 and r["concurrency"] == 3)
    assert result.summary["speedup_at_roofline"] == pytest.approx(3 / (at3["roofline_step_ms"] * 1e-3) / base["decode_tok_s"])


def test_bench_serve_without_the_prefill_level_and_a_small_warmup(local_ray, tiny_checkpoint, tmp_path) -> None:
    """--no-prefill-level runs only the serve levels; --warmup-streams caps the warm-up's streams."""
    out = tmp_path / "serve.json"
    cfg = ServeBenchConfig(model=tiny_checkpoint(), load_format="safetensors", device="cpu", dtype="float32",
                           mixes=((16, 3),), concurrency=(2,), waves=1, baseline=False, roofline=False,
                           prefill_level=False, warmup_streams=1, client_procs=1)
    main(cfg, out, None)
    saved = json.loads(out.read_text())
    assert [(r["kind"], r["concurrency"]) for r in saved["levels"]] == [("serve", 2)]
    assert saved["levels"][0]["errors"] == 0 and saved["warmup_s"] > 0 and saved["startup_s"] > 0
    reasons = saved["levels"][0]["rank_decode_eager_reasons"]  # on the CPU no graph is captured, and it says so
    assert sum(reasons.values()) > 0 and all("CPU" in r for r in reasons)
    assert saved["kv_cache"]["tokens_per_rank"] > 0


def test_client_processes_split_the_streams() -> None:
    from moecluster.cluster.bench.serve_load import STREAMS_PER_CLIENT, LoadLevel, client_processes, stream_slots

    # every stream slot runs in exactly one client, and every request in exactly one slot
    for c, parts, waves in ((3, 2, 2), (64, 3, 1), (7, 7, 3), (5, 1, 2)):
        lvl = LoadLevel(8, 4, c, c * waves, 100)
        slots = [s for p in range(parts) for s in stream_slots(lvl, p, parts)]
        assert slots == list(range(c)) and all(len(stream_slots(lvl, p, parts)) >= c // parts for p in range(parts))
        sent = sorted(i for s in slots for i in range(s, lvl.requests, c))
        assert sent == list(range(lvl.requests))

    def level(c: int, clients: int = 0) -> LoadLevel:
        return LoadLevel(8, 4, c, c, 100, clients=clients)

    assert client_processes(level(1)) == 1 and client_processes(level(5, clients=8)) == 5
    assert client_processes(level(64, clients=3)) == 3
    import os

    assert client_processes(level(4 * STREAMS_PER_CLIENT)) == min(4, max(1, (os.cpu_count() or 1) - 1))


def test_summarize_level_counts_and_percentiles() -> None:
    records = [RequestRecord(sent=0.0, token_times=[0.5, 0.6, 0.7], prompt_tokens=10, output_tokens=3),
               RequestRecord(sent=0.1, token_times=[0.4, 0.6, 0.8], prompt_tokens=10, output_tokens=3),
               RequestRecord(sent=0.2, error="RESOURCE_EXHAUSTED: queue full")]
    row = summarize_level(records, 0.0, 1.0, gpus=2, concurrency=1)
    assert row["errors"] == 1 and row["output_tokens"] == 6 and row["input_tokens"] == 20
    assert row["output_tok_s_per_gpu"] == pytest.approx(3.0)
    assert row["ttft_ms_p50"] == pytest.approx(500.0)
    assert row["itl_ms_p99"] == pytest.approx(200.0)
    # one stream open at a time (two waves of one): the decode rate counts one stream, not two
    assert row["decode_tok_s_per_gpu"] == pytest.approx(1 / (row["step_ms_p50"] * 1e-3) / 2)
    # TPOT per request: (0.7 - 0.5) / 2 = 100 ms and (0.8 - 0.4) / 2 = 200 ms; the median of two is the upper
    assert row["tpot_ms_p50"] == pytest.approx(200.0)
    assert row["tpot_decode_tok_s_per_gpu"] == pytest.approx(1 / 0.2 / 2)


def test_rank_decode_rate_from_decode_only_totals() -> None:
    from moecluster.cluster.bench.serve import _rank_decode_rate

    step = {"step": {"p50_ms": 5.0, "mean_ms": 5.0, "n": 10}}
    profiles = {
        "decode-0": [{**step, "decode_only": {"steps": 10, "rows": 640, "seconds": 0.05, "replayed": 10}},  # 64, 5 ms
                     {**step, "decode_only": {"steps": 10, "rows": 320, "seconds": 0.05, "replayed": 4}}],  # DP peer
        "decode-1": [step],  # ran no decode-only step
        "prefill-0": [{**step, "decode_only": {"steps": 1, "rows": 1, "seconds": 1.0}}],  # not a decode pool
    }
    rate, rows, replayed = _rank_decode_rate(profiles)
    assert rate == pytest.approx(640 / 0.05 + 320 / 0.05) and rows == pytest.approx(48.0)
    assert replayed == pytest.approx(14 / 20)  # 14 of the 20 decode-only steps replayed a graph
    assert _rank_decode_rate({"decode-0": [step]}) == (None, None, None)
    older = {"decode-0": [{**step, "decode_only": {"steps": 2, "rows": 8, "seconds": 0.01}}]}  # no replay count
    assert _rank_decode_rate(older)[2] is None


def test_tpot_holds_when_tokens_arrive_merged() -> None:
    """Tokens read together give 0 ms gaps (dropped from the step median, which then counts a
    three-token message as one step); the TPOT still reads the true pace, one token per 10 ms."""
    times = [0.0, 0.03, 0.03, 0.03, 0.06, 0.06, 0.06, 0.09, 0.09, 0.09]  # 10 tokens, read in threes
    records = [RequestRecord(sent=-0.1, token_times=times, prompt_tokens=4, output_tokens=10)]
    row = summarize_level(records, -0.1, 0.1, gpus=1, concurrency=1)
    assert row["itl_ms_p50"] == pytest.approx(0.0) and row["step_ms_p50"] == pytest.approx(30.0)
    assert row["decode_tok_s_per_gpu"] == pytest.approx(1 / 0.03)  # a third of the pace
    assert row["tpot_ms_p50"] == pytest.approx(10.0)
    assert row["tpot_decode_tok_s_per_gpu"] == pytest.approx(100.0)


@pytest.mark.parametrize("quant", ["fp8", "int4", "none"])
def test_random_weights_are_deterministic_finite_and_agree_across_expert_shards(tiny_checkpoint, quant) -> None:
    ckpt = tiny_checkpoint(quant=quant)
    a = load_model(ckpt, dtype="float32", load_format="random", seed=3)
    b = load_model(ckpt, dtype="float32", load_format="random", seed=3)
    c = load_model(ckpt, dtype="float32", load_format="random", seed=4)
    part = load_model(ckpt, dtype="float32", load_format="random", seed=3, expert_ids=[5, 2, 11])
    for (name, x), (_, y), (_, z) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), name
        if x.is_floating_point():
            assert torch.isfinite(x.float()).all(), name
    moe_a, moe_part = a.layers[1].mlp.experts, part.layers[1].mlp.experts
    for name in ("gate_proj", "up_proj", "down_proj"):
        full = getattr(moe_a, name).dequantize(torch.float32)
        mine = getattr(moe_part, name).dequantize(torch.float32)
        assert torch.equal(mine, full[[5, 2, 11]]), name  # an expert's weights do not depend on its rank
        # a linear layer's effective weights have std about 1/sqrt(in_features)
        assert full.std().item() == pytest.approx(full.shape[-1] ** -0.5, rel=0.25), name
    assert not torch.equal(a.layers[0].self_attn.o_proj.dequantize(torch.float32),
                           c.layers[0].self_attn.o_proj.dequantize(torch.float32))
    ids = torch.arange(8)
    hidden = a.embed_tokens[ids]
    assert torch.isfinite(a.logits(a.norm(hidden))).all()


def test_unknown_load_format_is_refused(tiny_checkpoint) -> None:
    with pytest.raises(ValueError, match="load_format 'dummy' is not supported"):
        load_model(tiny_checkpoint(), load_format="dummy")


@pytest.mark.parametrize("preset", ["deepseek-v3", "kimi-k2-thinking"])
def test_slice_keeps_published_shapes_and_a_full_vocabulary_tokenizer(tmp_path, preset) -> None:
    out = make_slice(tmp_path / preset, preset, layers=3, dense_layers=1)
    cfg = ModelConfig.from_dir(out)
    assert (cfg.num_hidden_layers, cfg.first_k_dense_replace, cfg.num_nextn_predict_layers) == (3, 1, 0)
    assert cfg.hidden_size == 7168 and cfg.moe_intermediate_size == 2048 and cfg.kv_lora_rank == 512
    assert (cfg.n_routed_experts, cfg.num_attention_heads) == ((256, 128) if preset == "deepseek-v3" else (384, 64))
    assert type(cfg.quant).__name__ == ("Fp8BlockScheme" if preset == "deepseek-v3" else "Int4GroupScheme")
    assert not list(out.glob("*.safetensors"))
    tok = load_tokenizer(out)
    assert tok.vocab_size == cfg.vocab_size
    assert tok.decode([5000, 77_777]) == " ~5000 ~77777"  # fillers past the trained BPE part decode to text
    assert all(isinstance(tok.decode([i]), str) for i in range(0, cfg.vocab_size, 997))
    assert "hello" in tok.decode(tok.encode("hello world"))
    assert cfg.eos_token_ids[0] == tok.eos_token_id


def test_slice_refuses_bad_depths() -> None:
    with pytest.raises(ValueError, match="at least one MoE layer"):
        slice_config("deepseek-v3", layers=2, dense_layers=2)
    with pytest.raises(ValueError, match="unknown model"):
        slice_config("llama", layers=2)
    with pytest.raises(ValueError, match="not a slice"):
        slice_config("kimi-k2", layers=99)


@pytest.mark.parametrize(("preset", "ranks"), [("kimi-k2-thinking", 8), ("deepseek-v3", 8), ("deepseek-v3", 2)])
def test_rank_proxy_slice_holds_what_an_ep_rank_holds(tmp_path, preset, ranks) -> None:
    """A slice with 1/N of the experts at full depth: every weight an EP=N rank of the full model
    holds, byte for byte, except the router's rows for the experts it lacks (float32, every layer)."""
    full = ModelConfig.from_hf(slice_config(preset, layers=61, dense_layers=3))
    n = full.n_routed_experts // ranks
    out = make_slice(tmp_path / "proxy", preset, layers=61, dense_layers=3, routed_experts=n)
    proxy = ModelConfig.from_dir(out)
    assert proxy.n_routed_experts == n
    same = ("num_experts_per_tok", "n_group", "topk_group", "hidden_size", "moe_intermediate_size", "vocab_size",
            "num_attention_heads", "num_hidden_layers", "routed_scaling_factor")
    assert all(getattr(proxy, f) == getattr(full, f) for f in same)
    rank, alone = layer_bytes(full, torch.bfloat16, n), layer_bytes(proxy, torch.bfloat16, n)
    assert alone["per_expert"] == rank["per_expert"] and alone["attention"] == rank["attention"]
    assert alone["lm_head"] == rank["lm_head"]
    moe_layers = 61 - 3
    assert rank["dense_and_shared"] - alone["dense_and_shared"] == moe_layers * (full.n_routed_experts - n) * 7168 * 4


def test_rank_proxy_slice_refuses_expert_counts_that_cannot_route() -> None:
    with pytest.raises(ValueError, match="between 8 and 256"):
        slice_config("deepseek-v3", layers=2, routed_experts=4)
    with pytest.raises(ValueError, match="multiple of 8"):
        slice_config("deepseek-v3", layers=2, routed_experts=36)
    with pytest.raises(ValueError, match="between 8 and 384"):
        slice_config("kimi-k2-thinking", layers=2, routed_experts=512)
    assert slice_config("kimi-k2-thinking", layers=2, routed_experts=48)["n_routed_experts"] == 48
    with pytest.raises(ValueError, match="does not apply to a checkpoint"):
        ServeBenchConfig(model=Path("ckpt"), routed_experts=32)
    with pytest.raises(ValueError, match="warmup_streams"):
        ServeBenchConfig(warmup_streams=0)


def test_cli_make_slice_writes_a_rank_proxy(tmp_path) -> None:
    assert cli(["make-slice", str(tmp_path / "s"), "--model", "deepseek-v3", "--layers", "4",
                "--routed-experts", "32"]) == 0
    assert json.loads((tmp_path / "s" / "config.json").read_text())["n_routed_experts"] == 32


def test_roofline_bytes_follow_the_formats(tmp_path) -> None:
    fp8 = ModelConfig.from_hf(slice_config("deepseek-v3", layers=2, dense_layers=1))
    parts = layer_bytes(fp8, torch.bfloat16, local_experts=256)
    weights = 3 * 7168 * 2048  # gate, up, down of one expert, one byte each in e4m3
    scales = (2 * 16 * 56 + 56 * 16) * 4  # float32 per 128 x 128 block
    assert parts["per_expert"] == weights + scales
    int4 = ModelConfig.from_hf(slice_config("kimi-k2-thinking", layers=2, dense_layers=1))
    assert layer_bytes(int4, torch.bfloat16, 384)["per_expert"] == weights // 2 + 3 * 7168 * 2048 // 32 * 2
    assert expected_experts_hit(256, 8, 1) == pytest.approx(8)
    assert expected_experts_hit(256, 8, 10_000) == pytest.approx(256)
    one = decode_step_roofline(fp8, torch.bfloat16, 64, 2048, ep=1, copy_gbs=3000.0)
    two = decode_step_roofline(fp8, torch.bfloat16, 64, 2048, ep=2, copy_gbs=3000.0)
    assert two["bytes"]["kv_cache"] == one["bytes"]["kv_cache"] / 2 == 32 * 2048 * 576 * 2 * 2
    assert two["bytes"]["routed_experts"] == pytest.approx(one["bytes"]["routed_experts"] / 2)
    assert one["roofline_ms"] == pytest.approx(one["bytes"]["total"] / 3e12 * 1e3)
    assert math.isclose(one["experts_hit_per_layer_per_rank"], expected_experts_hit(256, 8, 64))


def test_cli_bench_serve_rejects_bad_mix(capsys) -> None:
    with pytest.raises(SystemExit):
        cli(["bench", "serve", "--mix", "2000x100"])
    assert "IN:OUT" in capsys.readouterr().err


@pytest.mark.parametrize("w8a8", [False, True])
def test_moe_layer_step_on_a_tiny_model(tiny_checkpoint, w8a8) -> None:
    """`moe_layer_step` (CPU, fp32: the W8A8 options change nothing there) times one MoE layer of a
    tiny model and sets its bytes against the copy bandwidth given; the decode modes' context is
    entered and left again."""
    from moecluster.cluster.bench.roofline import moe_layer_step
    from moecluster.kernels.fp8_quant import w8a8_linear_default

    cfg = ModelConfig.from_hf(json.loads((tiny_checkpoint() / "config.json").read_text()))
    r = moe_layer_step(cfg, torch.float32, 4, 10.0, torch.device("cpu"), experts_w8a8=w8a8, linears_w8a8=w8a8)
    assert 1 <= r["experts_hit"] <= min(cfg.n_routed_experts, 4 * cfg.num_experts_per_tok)
    assert r["ms"] > 0 and r["bytes"] > 0
    assert r["roofline_ms"] == pytest.approx(r["bytes"] / 10e9 * 1e3)
    assert w8a8_linear_default(10**6, torch.zeros(1, dtype=torch.bfloat16))  # outside again: the defaults
