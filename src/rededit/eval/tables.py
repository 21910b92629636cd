"""The benchmark report's tables and figures: per category, the model beside the identity baseline and the
ground truth (``table.md``, ``table.csv``, ``chart.png``), and the edit grids shared by ``rededit-eval``, the
demo report and the training sample grids (:func:`render_grid`)."""

from __future__ import annotations

import csv
import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from rededit.inference.images import tensor_to_pil
from rededit.utils.io import atomic_path

SYSTEMS = ("model", "identity", "ground_truth")
SYSTEM_LABELS = {"model": "model", "identity": "identity (source)", "ground_truth": "ground truth"}
# (key, column title, format) in table order; a column appears when any system has a value for it.
TABLE_METRICS: tuple[tuple[str, str, str], ...] = (
    ("success", "success", ".3f"),
    ("judge_score", "judge score", ".3f"),
    ("ocr_score", "OCR score", ".3f"),
    ("vlm_score", "VLM score", ".2f"),
    ("vlm_failed", "VLM failure rate", ".3f"),
    ("edit_region_error", "edit-region L1", ".4f"),
    ("error_ratio", "ratio vs identity", ".3f"),
    ("psnr_outside", "PSNR outside (dB)", ".2f"),
    ("psnr", "PSNR (dB)", ".2f"),
    ("ssim", "SSIM", ".3f"),
    ("l1", "L1", ".4f"),
    ("l2", "L2", ".4f"),
)
CHART_METRICS = ("success", "ocr_score", "vlm_score", "ssim", "psnr_outside", "psnr")


def _cell(stat: Any, fmt: str) -> str:
    if not isinstance(stat, Mapping) or stat.get("mean") is None:
        return "–"
    s = format(stat["mean"], fmt)
    return s + (f" ± {format(stat['std'], fmt)}" if stat.get("std") is not None else "")


def _columns(systems: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    def has(key: str) -> bool:
        for sysres in systems.values():
            for block in [sysres["overall"], *sysres["categories"].values()]:
                if isinstance(block.get(key), Mapping) and block[key].get("mean") is not None:
                    return True
        return False

    return [c for c in TABLE_METRICS if has(c[0])]


def category_order(systems: Mapping[str, Any], cmap: Any) -> list[str]:
    cats = list(dict.fromkeys(c for s in systems.values() for c in s["categories"]))
    order = list(getattr(cmap, "keys", ()) or ())
    return [c for c in order if c in cats] + sorted(c for c in cats if c not in order)


def display_category(cat: str, cmap: Any) -> str:
    return cmap.name_of(cat) if cmap is not None and hasattr(cmap, "name_of") else cat


def table_rows(
    systems: Mapping[str, Any], cmap: Any
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, Mapping]]]:
    cols = _columns(systems)
    out = []
    for cat in [*category_order(systems, cmap), "__all__"]:
        for name in SYSTEMS:
            if name not in systems:
                continue
            block = systems[name]["overall"] if cat == "__all__" else systems[name]["categories"].get(cat)
            if block is not None:
                out.append(("all" if cat == "__all__" else display_category(cat, cmap), name, block))
    return cols, out


def render_markdown(result: Mapping[str, Any], systems: Mapping[str, Any], cmap: Any) -> str:
    cols, rows = table_rows(systems, cmap)
    s = result["sampler"]
    b = result["benchmark"]
    lines = [
        f"# rededit-eval: {b['name']} ({b['n_items']} items)",
        "",
        f"Checkpoint `{result['checkpoint']['path']}` ({result['checkpoint']['weights']} weights, sha256 "
        f"`{result['checkpoint']['sha256'][:16]}…`); benchmark hash `{b['hash'][:16]}…`; Euler steps {s['steps']}, "
        f"CFG {s['cfg']}, seeds {s['seeds']}; judge {result['judge_id'] or 'none'}.",
        "",
        "Model values are mean ± std over seeds. Reference rows, scored by the same harness: **identity** "
        "(Picture 1 returned unchanged) and **ground truth** (the benchmark's exact target, where it has one).",
        "",
        "| category | system | n | " + " | ".join(c[1] for c in cols) + " |",
        "|---|---|---:|" + "---:|" * len(cols),
    ]
    for cat, name, block in rows:
        label = SYSTEM_LABELS[name]
        cells = [_cell(block.get(k), fmt) for k, _, fmt in cols]
        cat_cell = f"**{cat}**" if cat == "all" else cat
        lines.append(f"| {cat_cell} | {label} | {block.get('n', '')} | " + " | ".join(cells) + " |")
    if result.get("failed_items"):
        failed = result["failed_items"]
        shown = "; ".join(f"`{k}` ({v})" for k, v in list(failed.items())[:5])
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        lines += [
            "",
            f"**{len(failed)} item(s) could not be read and are left out** (`metrics.json` "
            f"`failed_items`): {shown}{more}.",
        ]
    if result.get("skipped_metrics"):
        lines += [
            "",
            "Skipped metrics: " + "; ".join(f"{k} ({v})" for k, v in result["skipped_metrics"].items()),
        ]
    lines += ["", "![per-category chart](chart.png)", ""]
    lines += [f"![{c}](grids/{c}.png)" for c in result.get("grids", [])]
    return "\n".join(lines) + "\n"


def render_csv(systems: Mapping[str, Any], cmap: Any) -> str:
    cols, rows = table_rows(systems, cmap)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["category", "system", "n", *[f"{k}_{p}" for k, _, _ in cols for p in ("mean", "std")]])
    for cat, name, block in rows:
        vals = []
        for k, _, _ in cols:
            st = block.get(k) if isinstance(block.get(k), Mapping) else {}
            vals += [
                "" if st.get("mean") is None else repr(st["mean"]),
                "" if st.get("std") is None else repr(st["std"]),
            ]
        w.writerow([cat, name, block.get("n", ""), *vals])
    return buf.getvalue()


def plot_chart(systems: Mapping[str, Any], cmap: Any, out_png: Path) -> Path:
    """Grouped bars per category (model with std error bars, identity, ground truth) for headline metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = category_order(systems, cmap)
    cols = {c[0]: c[1] for c in _columns(systems)}
    metrics = [m for m in CHART_METRICS if m in cols][:2] or ["n"]
    fig, axes = plt.subplots(
        len(metrics), 1, figsize=(max(6, 0.9 * len(cats) + 2), 3.2 * len(metrics)), dpi=100, squeeze=False
    )
    try:
        x = np.arange(len(cats))
        names = [s for s in SYSTEMS if s in systems]
        width = 0.8 / max(1, len(names))
        for ax, metric in zip(axes[:, 0], metrics):
            for k, name in enumerate(names):
                means, errs = [], []
                for c in cats:
                    st = systems[name]["categories"].get(c, {}).get(metric)
                    if metric == "n":
                        st = {"mean": systems[name]["categories"].get(c, {}).get("n")}
                    means.append(
                        st.get("mean") if isinstance(st, Mapping) and st.get("mean") is not None else np.nan
                    )
                    errs.append(
                        st.get("std") if isinstance(st, Mapping) and st.get("std") is not None else 0.0
                    )
                ax.bar(
                    x + (k - (len(names) - 1) / 2) * width,
                    means,
                    width,
                    yerr=errs,
                    capsize=2,
                    label=SYSTEM_LABELS[name],
                )
            ax.set_xticks(x, [display_category(c, cmap) for c in cats], rotation=30, ha="right")
            ax.set_ylabel(cols.get(metric, metric))
            ax.grid(axis="y", alpha=0.3)
        axes[0, 0].legend(
            fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.02), ncol=len(names), frameon=False
        )
        fig.tight_layout()
        with atomic_path(out_png) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out_png


# -------------------------------------------------------------------------------------------- grids
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    import matplotlib

    path = (
        Path(matplotlib.get_data_path())
        / "fonts"
        / "ttf"
        / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    )
    return ImageFont.truetype(str(path), size) if path.is_file() else ImageFont.load_default()


def _wrap(text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.splitlines() or [""]:
        line = ""
        for word in para.split():
            trial = f"{line} {word}".strip()
            if font.getlength(trial) <= width or not line:
                line = trial
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def _fit(x: torch.Tensor | None, cell: int) -> Image.Image:
    """Image tensor scaled (nearest: tiny images stay readable) to fit a ``cell × cell`` white square."""

    canvas = Image.new("RGB", (cell, cell), "white")
    if x is None:
        return canvas
    img = tensor_to_pil(x)
    s = cell / max(img.size)
    img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.NEAREST)
    canvas.paste(img, ((cell - img.width) // 2, (cell - img.height) // 2))
    return canvas


def render_grid(
    samples: Sequence[Mapping[str, Any]], *, cell: int = 112, text_width: int = 260
) -> Image.Image:
    """Rows = samples; columns: source (Picture 1 or blank) | task + instruction | edit | ground truth."""
    pad, header = 4, 22
    font, bold = _font(11), _font(12, bold=True)
    widths = [cell, text_width, cell, cell]
    total_w = sum(widths) + pad * (len(widths) + 1)
    grid = Image.new("RGB", (total_w, header + len(samples) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    xs = np.cumsum([pad] + [w + pad for w in widths[:-1]]).tolist()
    for x, title in zip(xs, ("Picture 1", "instruction", "edit", "ground truth")):
        draw.text((x, 4), title, fill="black", font=bold)
    for r, s in enumerate(samples):
        y = header + r * (cell + pad)
        grid.paste(_fit(s["references"][0] if s["references"] else None, cell), (xs[0], y))
        grid.paste(_fit(s.get("pred"), cell), (xs[2], y))
        grid.paste(_fit(s["target"], cell), (xs[3], y))
        m = s.get("metrics", {})
        ratio, po = m.get("error_ratio"), m.get("psnr_outside")
        stats = f"ratio {ratio:.2f}" if ratio is not None and math.isfinite(ratio) else ""
        if po is not None and math.isfinite(po):
            stats += f"  PSNR out {po:.1f} dB"
        draw.text((xs[1], y), f"{s['task']}  {stats}".strip(), fill=(160, 0, 0), font=bold)
        lines = _wrap(s["text"], font, text_width)
        max_lines = (cell - 16) // 13
        if len(lines) > max_lines:
            lines = [*lines[: max_lines - 1], textwrap.shorten(" ".join(lines[max_lines - 1 :]), 40) + " …"]
        draw.multiline_text((xs[1], y + 16), "\n".join(lines), fill="black", font=font, spacing=2)
    return grid
