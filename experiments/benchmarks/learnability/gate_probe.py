"""Where vs what: an edit-gate editor's gate inside and outside the edit, and its ungated prediction's error.

For the bench items with one reference and an edit mask, one forward at σ = 1 (pure noise): the mean gate
``sigmoid(g)`` on the latent sites inside the edit (mask > 0.5) and outside it (mask < 0.01), and the edit-region
L1 of the composite (what the sampler uses) and of the ungated prediction ``z_ref1 + Δ``, each divided by the
identity baseline's, per task. Learnability round 13 (README) used it::

    python experiments/benchmarks/learnability/gate_probe.py --checkpoint <run>/export --manifest <corpus>/manifest.parquet
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch

from rededit.models.edit_gate import mask_targets

sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder's shared helper, bench_items
import bench_items


def main() -> None:
    args = bench_items.parser(__doc__, per_task=16).parse_args()
    editor, samples = bench_items.load(args)
    backbone = editor.backbone
    if backbone.edit_gate is None:
        raise SystemExit(f"{args.checkpoint}: the editor has no edit gate")
    stats: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in samples:
            batch = {
                "target": s["target"][None],
                "references": [s["references"][0][None]],
                "texts": [s["text"]],
            }
            x0, refs = editor.encode_images(batch)
            emb, emb_mask = editor.text_condition(batch)
            sigma = torch.ones(1)
            x_t = torch.randn(x0.shape, generator=generator)
            composite = backbone.predicted_x0(x_t, backbone(x_t, refs, sigma, emb, emb_mask), sigma)
            gate = torch.sigmoid(backbone.last_gate_logits)
            m = mask_targets(s["mask"][None], tuple(gate.shape[-2:]), pixels=gate.shape[1])
            row = stats[s["task"]]
            row["gate_in"].append(gate[m > 0.5].mean().item())
            if (m < 0.01).any():
                row["gate_out"].append(gate[m < 0.01].mean().item())
            edited = mask_targets(s["mask"][None], tuple(x0.shape[-2:])).expand_as(x0) > 0.5
            for name, pred in (
                ("composite", composite),
                ("ungated", backbone.last_ungated_x0),
                ("identity", refs[0]),
            ):
                row[name].append((pred - x0).abs()[edited].mean().item())
    print(
        "| task | gate inside | gate outside | composite ratio | ungated ratio |\n|---|---:|---:|---:|---:|"
    )
    for task in sorted(stats):
        row = stats[task]
        mean = {k: sum(v) / len(v) if v else float("nan") for k, v in row.items()}
        print(
            f"| {task} | {mean['gate_in']:.3f} | {mean.get('gate_out', float('nan')):.3f} | "
            f"{mean['composite'] / mean['identity']:.2f} | {mean['ungated'] / mean['identity']:.2f} |"
        )


if __name__ == "__main__":
    main()
