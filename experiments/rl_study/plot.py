"""Plot of the RL study (issue 6/9): DPO win/lose-diff trajectories per arm, NFT reward and text area.

    python experiments/rl_study/plot.py [results.json] [plot.png]

Reads what ``run.py`` writes (``results.json``: per arm and seed, ``dpo/win_diff`` and ``dpo/lose_diff`` per
step; NFT reward and text-area monitor first/last) and draws mean ± std over seeds.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _mean_std_by_step(series: list[dict[str, float]]) -> tuple[list[int], list[float], list[float]]:
    steps = sorted({int(k) for s in series for k in s})
    means, stds = [], []
    for step in steps:
        vals = [s[str(step)] if str(step) in s else s.get(step) for s in series]
        vals = [v for v in vals if v is not None]
        means.append(statistics.fmean(vals))
        stds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    return steps, means, stds


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dpo = [k for k, v in results.items() if "win_diff" in v]
    nft = [k for k, v in results.items() if "reward_first" in v]
    fig, axes = plt.subplots(1, len(dpo) + 1, figsize=(4.2 * (len(dpo) + 1), 3.4))
    for ax, name in zip(axes, dpo):
        for key, colour in (("win_diff", "tab:green"), ("lose_diff", "tab:red")):
            steps, m, s = _mean_std_by_step(results[name][key])
            ax.plot(steps, m, color=colour, label=key)
            ax.fill_between(
                steps, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=colour, alpha=0.2
            )
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{name}: policy − reference loss", fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    ax = axes[-1]
    labels, firsts, lasts = [], [], []
    for name in nft:
        for key in ("reward", "area"):
            labels.append(f"{name}\n{key}")
            firsts.append(statistics.fmean(results[name][f"{key}_first"]))
            lasts.append(statistics.fmean(results[name][f"{key}_last"]))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], firsts, width=0.4, label="first step")
    ax.bar([x + 0.2 for x in xs], lasts, width=0.4, label="last step")
    ax.set_xticks(list(xs), labels, fontsize=6)
    ax.set_title("NFT: train reward and text-area monitor", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle("RL study: mean ± std over seeds", fontsize=10)
    from rededit.utils.io import save_figure

    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    src = Path(argv[0]) if argv else HERE / "results.json"
    out = Path(argv[1]) if len(argv) > 1 else src.with_name("plot.png")
    plot(json.loads(src.read_text()), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
