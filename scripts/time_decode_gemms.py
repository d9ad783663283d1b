"""Time the FP8 GEMMs of one rank's decode step on a GPU, each against its bytes over the copy
bandwidth: the dense projections (`fp8_linear`, W8A16 as in the decode graphs: DeepSeek-V3's
q_a, kv_a, q_b, o, the dense MLP and the shared expert) at the rank's rows, and the routed
experts (`grouped_mlp`) at an expert-parallel rank's share of a batch (world x tokens tokens,
uniform top-k routing, this rank's E / world experts; rows = world * tokens * top_k as the
gather dispatch hands them over). Each is timed at the library's defaults and over candidate
tiles (with split-K for the linears), replayed from CUDA graphs as the decode step runs them;
prints tables and writes JSON.

    python scripts/time_decode_gemms.py [--rows 16,32,64] [--world 2,1] [--batch 64] [--out gemms.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import torch
from triton.testing import do_bench_cudagraph

from moecluster.cluster.bench.kernels import copy_bandwidth_gbs, random_fp8
from moecluster.cluster.plan.presets import PRESETS
from moecluster.kernels import fused_moe as fm
from moecluster.kernels.moe_tiles import TileConfig

LINEAR_TILES = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 128, 4, 4),
                (64, 128, 64, 8, 3), (16, 64, 128, 4, 6), (16, 32, 128, 4, 4)]
SPLITS = (1, 2, 4, 8, 16, 32)
EXPERT_TILES = [(16, 64, 128, 4, 4), (16, 32, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 128, 4, 6), (16, 64, 64, 4, 6),
                (16, 128, 128, 8, 4), (16, 64, 128, 2, 4), (16, 128, 64, 4, 6), (16, 64, 256, 4, 3), (16, 128, 256, 8, 3),
                (16, 32, 256, 4, 4), (16, 64, 128, 4, 8)]
# W8A8 (--experts-w8a8): K steps of one 128-deep scale block (one e4m3 dot each)
EXPERT_TILES_W8A8 = [(64, 128, 128, 8, 3), (64, 256, 128, 8, 3), (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 128, 4, 6),
                     (16, 32, 128, 4, 4), (16, 128, 128, 8, 4), (16, 256, 128, 8, 3), (16, 64, 128, 2, 4), (32, 64, 128, 4, 4),
                     (64, 64, 128, 4, 4), (16, 128, 128, 4, 6)]


def ms(fn) -> float:  # noqa: ANN001
    """Median ms of fn replayed from a CUDA graph, as the decode step runs it (no launch cost)."""
    try:
        return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))
    except Exception as e:  # noqa: BLE001 - a configuration that does not fit is reported and skipped
        print(f"  skip: {type(e).__name__}: {str(e)[:90]}", flush=True)
        return float("inf")


def linear_shapes(cfg: dict, layers: int, dense_layers: int) -> list[tuple[str, int, int, int]]:
    """(name, N, K, launches per decode step) of DeepSeek-V3's FP8 dense linears in a slice of
    `layers` layers, the first `dense_layers` dense (gate and up are separate launches)."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    shared = cfg["moe_intermediate_size"] * cfg.get("n_shared_experts", 1)
    moe = layers - dense_layers
    return [("q_a", cfg["q_lora_rank"], h, layers), ("kv_a", cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"], h, layers),
            ("q_b", heads * qk, cfg["q_lora_rank"], layers), ("o", h, heads * cfg["v_head_dim"], layers),
            ("dense_gate_up", cfg["intermediate_size"], h, 2 * dense_layers), ("dense_down", h, cfg["intermediate_size"], dense_layers),
            ("shared_gate_up", shared, h, 2 * moe), ("shared_down", h, shared, moe)]


def time_linears(cfg: dict, rows_list: list[int], bw: float, g: torch.Generator, layers: int, dense_layers: int) -> list[dict]:
    out = []
    for name, n, k, launches in linear_shapes(cfg, layers, dense_layers):
        w = (torch.randn(n, k, device="cuda", generator=g) * 2).to(torch.float8_e4m3fn)
        s = torch.rand(-(-n // 128), -(-k // 128), device="cuda", generator=g) * 0.01
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=g)
            nbytes = n * k + s.numel() * 4 + rows * (k + n) * 2
            whole = fm.fp8_linear(x, w, s, fp8_activations=False, tiles=TileConfig(16, 64, 128, 4, 4, split_k=1)).float()
            default = ms(lambda: fm.fp8_linear(x, w, s, fp8_activations=False))
            err = float((fm.fp8_linear(x, w, s, fp8_activations=False).float() - whole).abs().max())
            cands = {}
            for t, sp in itertools.product(LINEAR_TILES, SPLITS):
                if t[0] > max(16, 2 * rows):
                    continue
                tiles = TileConfig(*t, split_k=sp)
                cands[f"{'x'.join(map(str, t))}/s{sp}"] = ms(lambda: fm.fp8_linear(x, w, s, fp8_activations=False, tiles=tiles))
            best = min(cands, key=cands.get)
            no_split = min(v for c, v in cands.items() if c.endswith("/s1"))
            r = {"name": name, "n": n, "k": k, "rows": rows, "launches_per_step": launches, "default_ms": default, "best_ms": cands[best], "best": best,
                 "best_unsplit_ms": no_split, "roofline_ms": nbytes / bw / 1e6, "default_max_diff_vs_unsplit": err,
                 "all_ms": cands}
            out.append(r)
            print(f"{name:>15} {n:6d}x{k:<6d} rows {rows:3d}  default {default:.4f}  unsplit best {no_split:.4f}  "
                  f"best {cands[best]:.4f} ({best})  roofline {r['roofline_ms']:.4f} ms  |diff| {err:.2e}", flush=True)
    return out


def time_experts(cfg: dict, world: int, tokens: int, bw: float, g: torch.Generator, w8a8: bool = False) -> dict:
    e_all, top_k, h, i = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["hidden_size"], cfg["moe_intermediate_size"]
    local = e_all // world
    ids = torch.rand(world * tokens, e_all, device="cuda", generator=g).topk(top_k, dim=1).indices.reshape(-1)
    counts = torch.bincount(ids[ids < local], minlength=local).to(torch.int32)  # rank 0's experts
    rows = world * tokens * top_k
    weights = fm.Fp8Experts(*(t for o, k in ((i, h), (i, h), (h, i)) for t in random_fp8(local, o, k, g)))
    x = torch.randn(rows, h, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1
    hit = int((counts > 0).sum())
    nbytes = hit * 3 * h * i + int(counts.sum()) * h * 4
    kw = {"fp8_activations": w8a8}
    tiles = EXPERT_TILES_W8A8 if w8a8 else EXPERT_TILES
    d_gu, d_dn = fm.default_tiles(rows, weights, x.dtype, fp8_activations=w8a8)
    default = ms(lambda: fm.grouped_mlp(x, counts, weights, **kw))
    gu = {c: ms(lambda c=c: fm.grouped_mlp(x, counts, weights, gate_up_tiles=TileConfig(*c), down_tiles=d_dn, **kw))
          for c in tiles}
    best_gu = min(gu, key=gu.get)
    dn = {c: ms(lambda c=c: fm.grouped_mlp(x, counts, weights, gate_up_tiles=TileConfig(*best_gu), down_tiles=TileConfig(*c),
                                           **kw)) for c in tiles}
    best_dn = min(dn, key=dn.get)
    want = fm.grouped_mlp(x, counts, weights, **kw).float()
    got = fm.grouped_mlp(x, counts, weights, gate_up_tiles=TileConfig(*best_gu), down_tiles=TileConfig(*best_dn), **kw).float()
    n = int(counts.sum())
    best_vs_default = float((got[:n] - want[:n]).abs().max() / want[:n].abs().max())
    # the mode swept is `default` already; the other one is timed once more (W8A8: x quantized inside, as served)
    w8a8_ms = default if w8a8 else ms(lambda: fm.grouped_mlp(x, counts, weights, fp8_activations=True))
    w8a16_ms = ms(lambda: fm.grouped_mlp(x, counts, weights, fp8_activations=False)) if w8a8 else default
    r = {"mode": "w8a8" if kw["fp8_activations"] else "w8a16", "best_vs_default_max_rel_diff": best_vs_default,
         "w8a8_default_ms": w8a8_ms, "w8a16_default_ms": w8a16_ms, "world": world, "tokens": tokens, "rows": rows, "pairs_here": int(counts.sum()), "experts_hit": hit,
         "default_tiles": [dataclasses.astuple(d_gu), dataclasses.astuple(d_dn)], "default_ms": default,
         "best_gate_up": best_gu, "best_down": best_dn, "best_ms": dn[best_dn], "roofline_ms": nbytes / bw / 1e6,
         "gate_up_ms": {"x".join(map(str, c)): v for c, v in gu.items()}, "down_ms": {"x".join(map(str, c)): v for c, v in dn.items()}}
    print(f"experts world {world} x {tokens} tokens: {r['pairs_here']} pairs on {hit} of {local} experts; default "
          f"{default:.3f} ms, best {r['best_ms']:.3f} ({best_gu} / {best_dn}), W8A8 default {w8a8_ms:.3f}, W8A16 default {w8a16_ms:.3f}, roofline {r['roofline_ms']:.3f} ms",
          flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="deepseek-v3")
    p.add_argument("--rows", default="16,32,64", help="rows of the dense linears (the rank's sequences)")
    p.add_argument("--layers", type=int, default=4, help="layers of the slice whose decode step is summed")
    p.add_argument("--dense-layers", type=int, default=1)
    p.add_argument("--world", default="2,1", help="expert-parallel sizes for the routed experts")
    p.add_argument("--batch", type=int, default=64, help="decode tokens over the expert-parallel group")
    p.add_argument("--skip", default="", help="linears,experts")
    p.add_argument("--experts-w8a8", action="store_true", help="sweep the routed experts' W8A8 tiles (else W8A16)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg = PRESETS[args.preset]
    g = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth_gbs()
    print(f"copy {bw:.0f} GB/s", flush=True)
    result: dict = {"preset": args.preset, "copy_gbs": bw}
    if "linears" not in args.skip:
        rows_list = [int(r) for r in args.rows.split(",")]
        result["linears"] = lin = time_linears(cfg, rows_list, bw, g, args.layers, args.dense_layers)
        result["step_sums"] = {}
        for rows in rows_list:  # one decode step's FP8 linears: each shape's time x its launches
            sums = {key: sum(r[key] * r["launches_per_step"] for r in lin if r["rows"] == rows)
                    for key in ("default_ms", "best_ms", "roofline_ms")}
            result["step_sums"][rows] = sums
            print(f"rows {rows}: a step's FP8 linears ({args.layers} layers) default {sums['default_ms']:.3f} ms, "
                  f"best {sums['best_ms']:.3f}, roofline {sums['roofline_ms']:.3f}", flush=True)
    if "experts" not in args.skip:
        result["experts"] = [time_experts(cfg, int(w), args.batch // int(w), bw, g, args.experts_w8a8) for w in args.world.split(",")]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
