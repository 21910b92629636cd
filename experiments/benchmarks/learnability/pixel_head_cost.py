"""Cost of the pixel head: the demo backbone's forward + backward with and without it, as a ratio.

Batch 8 of 64×64 edits (16×16 latents, one reference, 20 text tokens), 1 torch thread, 5 warm-up then 30 timed
steps, three interleaved rounds; prints the per-step times, the ratio of the medians and the load average::

    python experiments/benchmarks/learnability/pixel_head_cost.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

from rededit.models.backbone import EditBackbone

sys.path.insert(
    0, str(Path(__file__).resolve().parents[3] / "tests")
)  # conftest.compose: the composed recipe
from conftest import compose


def main() -> None:
    torch.set_num_threads(1)
    config = dict(compose(["experiment=demo"]).backbone.transformer_config)
    g = torch.Generator().manual_seed(0)
    x, ref = torch.randn(8, 48, 16, 16, generator=g), torch.randn(8, 48, 16, 16, generator=g)
    text, sigma = torch.randn(8, 20, 384, generator=g), torch.rand(8, generator=g)
    times: dict[str, list[float]] = {"off": [], "pixel_head": []}
    for _ in range(3):
        for name, option in (("off", False), ("pixel_head", {"pixels": 16})):
            torch.manual_seed(0)
            backbone = EditBackbone(
                transformer_config=config,
                prediction="x0",
                source_residual=True,
                zero_init_output=True,
                zero_cond_t=True,
                pixel_head=option,
            )
            for step in range(35):
                if step == 5:
                    start = time.perf_counter()
                backbone(x, [ref], sigma, text, None).square().mean().backward()
            times[name].append((time.perf_counter() - start) / 30)
    ratio = statistics.median(times["pixel_head"]) / statistics.median(times["off"])
    print(
        {k: [round(v, 4) for v in vs] for k, vs in times.items()},
        f"ratio {ratio:.3f}",
        "load",
        os.getloadavg(),
    )


if __name__ == "__main__":
    main()
