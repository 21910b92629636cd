"""How much of an editor's error outside the edit is seed-to-seed spread, per number of Euler steps.

For the bench items with one reference and an edit mask, edit each with ``--seeds`` noise seeds and report, inside
and outside the mask: the mean over pixels of the per-pixel std across seeds, of |mean over seeds − ground truth|
and of |one edit − ground truth| (images in [−1, 1]). Learnability round 12 (README) used it on an export::

    python experiments/benchmarks/learnability/noise_spread.py --checkpoint <run>/export --manifest <corpus>/manifest.parquet
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from rededit.eval.demo_report import edit_request
from rededit.inference.edit_loop import edit_batch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared helper, bench_items
import bench_items


def main() -> None:
    p = bench_items.parser(__doc__, per_task=4)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--steps", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    editor, samples = bench_items.load(args)
    requests = [edit_request(s) for s in samples]
    target = torch.stack([s["target"] for s in samples])
    inside = torch.stack([s["mask"] for s in samples]).bool().expand_as(target)
    for steps in args.steps:
        edits = torch.stack(
            [
                torch.cat(
                    [
                        edit_batch(editor, requests[i : i + 8], seed=seed, steps=steps)
                        for i in range(0, len(requests), 8)
                    ]
                )
                for seed in range(args.seeds)
            ]
        )  # [seeds, N, 3, H, W]
        spread, bias, one = edits.std(0), (edits.mean(0) - target).abs(), (edits[0] - target).abs()
        for name, region in (("outside", ~inside), ("inside", inside)):
            print(
                f"steps={steps} {name}: seed spread {spread[region].mean():.3f}, |mean over seeds − gt| "
                f"{bias[region].mean():.3f}, |one edit − gt| {one[region].mean():.3f}"
            )


if __name__ == "__main__":
    main()
