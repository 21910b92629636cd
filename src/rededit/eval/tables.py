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
from rededit.scoring.edit_metrics import PSNR_CAP
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
# Headline metrics of the chart, in panel order: (key, title, which direction is better).
CHART_METRICS: tuple[tuple[str, str, str], ...] = (
    ("vlm_score", "VLM judge score", "higher"),
    ("ocr_score", "OCR score", "higher"),
    ("success", "programmatic success", "higher"),
    ("edit_region_error", "edit-region L1", "lower"),
    ("psnr_outside", "PSNR outside the edit (dB)", "higher"),
    ("ssim", "SSIM", "higher"),
)
# Scored against the ground truth itself: the ground-truth row is perfect by construction.
REFERENCE_METRICS = frozenset(
    {"edit_region_error", "identity_error", "error_ratio", "psnr_outside", "psnr", "ssim", "l1", "l2"}
)
SYSTEM_COLOURS = {"model": "tab:blue", "identity": "tab:gray", "ground_truth": "tab:green"}


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


def _mean(systems: Mapping[str, Any], name: str, cat: str, metric: str) -> float | None:
    st = systems.get(name, {}).get("categories", {}).get(cat, {}).get(metric)
    return float(st["mean"]) if isinstance(st, Mapping) and st.get("mean") is not None else None


def chart_panels(systems: Mapping[str, Any], cmap: Any = None) -> tuple[list[str], list[str]]:
    """The headline metrics :func:`plot_chart` draws, and one-line notes on the ones it leaves out.

    A metric gets a panel when some category has a value for it, unless the model and the identity baseline
    have the same value in every category (e.g. a success rate of 0 for both): such a panel tells nothing a
    note cannot, so the note says it.
    """
    panels, notes = [], []
    cats = category_order(systems, cmap)
    for key, title, _ in CHART_METRICS:
        model = [_mean(systems, "model", c, key) for c in cats]
        if all(v is None for v in model):
            continue
        if "identity" in systems:
            ident = [_mean(systems, "identity", c, key) for c in cats]
            pairs = [(m, i) for m, i in zip(model, ident) if m is not None or i is not None]
            if pairs and all(m is not None and i is not None and abs(m - i) <= 1e-9 for m, i in pairs):
                values = sorted({round(m, 3) for m, _ in pairs})
                shown = f"{values[0]:g}" if len(values) == 1 else "equal values"
                notes.append(f"{title}: model = identity ({shown}) in every category, not drawn")
                continue
        panels.append(key)
    return panels, notes


def plot_chart(systems: Mapping[str, Any], cmap: Any, out_png: Path) -> Path:
    """Per-category headline metrics (:func:`chart_panels`): grouped bars of the model (mean ± std over seeds)
    beside the identity baseline and, on judged metrics, the ground truth; one panel per metric, with the
    direction that is better in its title. On reference metrics (L1, PSNR, SSIM against the ground truth) the
    ground truth is perfect by construction and is not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = category_order(systems, cmap)
    panels, notes = chart_panels(systems, cmap)
    titles = {k: (t, better) for k, t, better in CHART_METRICS}
    if not panels:
        panels, titles["n"] = ["n"], ("items", "")
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    panel_w = max(5.0, 0.55 * len(cats) + 1.5)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(panel_w * ncols, 3.0 * nrows + 1.4), dpi=100, squeeze=False
    )
    top_in, bottom_in = 0.55, (0.35 if notes else 0.0)  # inches for the title + legend, and the notes
    try:
        x = np.arange(len(cats))
        for ax in axes.flat[len(panels) :]:
            ax.axis("off")
        for ax, metric in zip(axes.flat, panels):
            names = [
                s
                for s in SYSTEMS
                if s in systems and not (s == "ground_truth" and metric in REFERENCE_METRICS)
            ]
            width = 0.8 / max(1, len(names))
            values: dict[str, tuple[list[float], list[float]]] = {}
            for name in names:
                means, errs = [], []
                for c in cats:
                    block = systems[name]["categories"].get(c, {})
                    st = {"mean": block.get("n")} if metric == "n" else block.get(metric)
                    ok = isinstance(st, Mapping)
                    means.append(st["mean"] if ok and st.get("mean") is not None else np.nan)
                    errs.append(st["std"] if ok and st.get("std") is not None else 0.0)
                values[name] = means, errs
            # PSNR of identical pixels is capped at 100 dB: such bars would flatten every other one, so the
            # axis stops above the largest real value and the capped bars are labelled.
            capped = metric.startswith("psnr")
            real = [v for m, _ in values.values() for v in m if np.isfinite(v) and v < PSNR_CAP - 1e-6]
            top = max(real) * 1.3 if capped and real else None
            for k, name in enumerate(names):
                means, errs = values[name]
                xs = x + (k - (len(names) - 1) / 2) * width
                shown = [min(v, top) if top is not None and np.isfinite(v) else v for v in means]
                ax.bar(
                    xs,
                    shown,
                    width,
                    yerr=errs if any(errs) else None,
                    capsize=2,
                    color=SYSTEM_COLOURS[name],
                    label=SYSTEM_LABELS[name],
                )
                for xi, v in zip(xs, means):
                    if top is not None and np.isfinite(v) and v >= PSNR_CAP - 1e-6:
                        ax.text(
                            xi, 0.97 * top, "100: identical", rotation=90, ha="center", va="top", fontsize=6
                        )
            if top is not None:
                ax.set_ylim(0, top)
            title, better = titles[metric]
            ax.set_title(f"{title}" + (f" ({better} is better)" if better else ""), fontsize=10)
            ax.set_xticks(x, [display_category(c, cmap) for c in cats], rotation=30, ha="right", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        height = fig.get_figheight()
        handles = {lab: h for ax in axes.flat for h, lab in zip(*ax.get_legend_handles_labels(), strict=True)}
        fig.suptitle(
            "Per category: the model (mean ± std over seeds) against returning Picture 1 unchanged (identity) "
            "and the benchmark's own target (ground truth)",
            fontsize=9,
            y=1 - 0.08 / height,
            va="top",
        )
        fig.legend(
            handles.values(),
            handles.keys(),
            loc="upper center",
            bbox_to_anchor=(0.5, 1 - 0.32 / height),
            ncol=len(handles),
            frameon=False,
            fontsize=8,
        )
        if notes:
            fig.text(0.01, 0.08 / height, "; ".join(notes), fontsize=8, ha="left", va="bottom")
        fig.tight_layout(rect=(0, bottom_in / height, 1, 1 - top_in / height))
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
