"""bf16 experts: the Triton kernel against the grouped-GEMM path (`kernels/grouped_mm_mlp.py`) at
rising rows per expert, DeepSeek-V3 expert shapes (32 local experts, H 7168, I 2048), beside
`torch._grouped_mm` with torch's SiLU and mul: where `grouped_mm_mlp.MIN_ROWS_PER_EXPERT` should sit.

    OUT=. python scripts/time_bf16_moe_paths.py 64,128,192,256,384,512   # writes $OUT/bf16-moe-paths.json
"""

from __future__ import annotations

import json
import os
import sys

import torch

from moecluster.cluster.bench.kernels import _time_ms, grouped_mm_baseline
from moecluster.kernels import fused_moe as fm
from moecluster.kernels import grouped_mm_mlp as gm

E, H, I = 32, 7168, 2048  # noqa: E741


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    w = fm.DenseExperts(w13[:, :I], w13[:, I:], w2)
    rows_out = []
    for m in (int(s) for s in sys.argv[1].split(",")):
        x = torch.randn(E * m, H, device="cuda", dtype=torch.bfloat16, generator=g)
        counts = torch.full((E,), m, device="cuda", dtype=torch.int32)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        gu_t, dn_t = fm.default_tiles(E * m, w, x.dtype)
        row = {
            "rows_per_expert": m,
            "grouped_mm_torch_ms": _time_ms(lambda: grouped_mm_baseline(x, w13, w2, offs)),
            "triton_ms": _time_ms(lambda: fm.grouped_mlp(x, counts, w, gate_up_tiles=gu_t, down_tiles=dn_t)),
            "grouped_mm_path_ms": _time_ms(lambda: gm.grouped_mlp(x, None, counts, w)),
            "default_path": "grouped_mm" if gm.supported(x, w, E * m) else "triton",
        }
        rows_out.append(row)
        print(f"{m:5d} torch {row['grouped_mm_torch_ms']:.3f} triton {row['triton_ms']:.3f} "
              f"grouped_mm path {row['grouped_mm_path_ms']:.3f} default {row['default_path']}", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "bf16-moe-paths.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()
