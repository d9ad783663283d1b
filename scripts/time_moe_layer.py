"""Time one MoE layer of a preset (all experts on this GPU, random weights in the checkpoint's
format, the engine's kernels, replayed from a CUDA graph) on decode batches against its roofline:
the same measurement `moecluster bench serve` makes after its levels, without serving.

    python scripts/time_moe_layer.py --preset kimi-k2-thinking --tokens 1,16,64 [--out moe-layer.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from moecluster.cluster.bench.roofline import copy_bandwidth_gbs, moe_layer_step
from moecluster.cluster.bench.slice_model import slice_config
from moecluster.workers.config import ModelConfig


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="kimi-k2-thinking")
    p.add_argument("--tokens", default="1,16,64")
    p.add_argument("--repeat", type=int, default=2, help="measurements per size (new random weights each)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg = ModelConfig.from_hf(slice_config(args.preset, 2))  # one dense layer, then the MoE layer timed
    device = torch.device("cuda")
    bw = copy_bandwidth_gbs(device)
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for seed in range(args.repeat):
            r = moe_layer_step(cfg, torch.bfloat16, tokens, bw, device, seed)
            rows.append(r)
            print(f"{args.preset} tokens {tokens:4d} seed {seed}: {r['experts_hit']} experts, graph {r['ms']:.3f} ms, "
                  f"eager {r['eager_ms']:.3f} ms, roofline {r['roofline_ms']:.3f} ms, {r['vs_roofline']:.2f}x", flush=True)
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "copy_gbs": bw, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
