"""The one loop that runs an editor over many items: benchmark, demo report, sample grids, DPO pairs, mining.

Every caller turns its items into :class:`EditRequest`s (instruction, references at the editor's sizes,
output size, and the item's object boxes for backbone region tokens) and gets the edits back in order.
Requests are batched by their shapes (diffusers' Qwen transformer reads one ``img_shapes`` per batch) and
each sample's noise comes from its own seed, :func:`edit_seed` ``(seed, item id, sample)``, so an item's edit
is the same whichever caller, batch size or neighbours it is edited with.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rededit.utils.logging import get_logger
from rededit.utils.seeding import derive_seed

log = get_logger(__name__)


@dataclasses.dataclass
class EditRequest:
    """One edit to make.

    Attributes:
        id: the item's id (with ``sample``, the noise seed's identity).
        text: the instruction (a text-to-image prompt when ``references`` is empty).
        references: Picture 1, 2, … as ``[3, H_k, W_k]`` in [-1, 1], already at the editor's sizes.
        hw: output ``(height, width)``.
        object_boxes: ``[O, 4]`` boxes (x0, y0, x1, y1) in output pixels, or None; read only by an editor
            with backbone region tokens.
        sample: which of several edits of the same item (0 for the first).
    """

    id: str
    text: str
    references: list[torch.Tensor]
    hw: tuple[int, int]
    object_boxes: Any = None
    sample: int = 0

    @property
    def shapes(self) -> tuple:
        return (tuple(self.hw), tuple(tuple(r.shape[-2:]) for r in self.references))


def edit_seed(seed: int, item_id: str, sample: int = 0) -> int:
    """The noise seed of edit ``sample`` of item ``item_id`` in a run seeded ``seed``."""
    return derive_seed("rededit-edit", int(seed), str(item_id), int(sample))


def uses_boxes(editor: Any) -> bool:
    """Whether the editor's backbone reads object boxes (FireEdit region tokens)."""
    return getattr(getattr(editor, "backbone", None), "region_tokens", None) is not None


def shape_batches(requests: Sequence[EditRequest], batch_size: int) -> list[list[int]]:
    """Indices of ``requests`` grouped by shapes (first-seen order), split into batches of ``batch_size``."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(requests):
        groups[r.shapes].append(i)
    return [g[lo : lo + batch_size] for g in groups.values() for lo in range(0, len(g), batch_size)]


@torch.no_grad()
def edit_batch(
    editor: Any,
    requests: Sequence[EditRequest],
    *,
    seed: int,
    steps: int | None = None,
    cfg_scale: float | None = None,
    negative_prompt: str | None = None,
) -> torch.Tensor:
    """Edits ``[B, 3, H, W]`` in [-1, 1] (on the CPU) of requests that share their shapes."""
    if len({r.shapes for r in requests}) != 1:
        raise ValueError(f"edit_batch: requests of different shapes {sorted({r.shapes for r in requests})}")
    first = requests[0]
    refs = [torch.stack([r.references[k] for r in requests]) for k in range(len(first.references))]
    boxes = {"object_boxes": [r.object_boxes for r in requests]} if uses_boxes(editor) else {}
    h, w = first.hw
    return editor.generate(
        refs,
        [r.text for r in requests],
        height=h,
        width=w,
        seed=[edit_seed(seed, r.id, r.sample) for r in requests],
        steps=steps,
        cfg_scale=cfg_scale,
        negative_prompt=negative_prompt,
        **boxes,
    ).cpu()


def iter_edits(
    editor: Any, requests: Sequence[EditRequest], *, seed: int, batch_size: int = 8, **kwargs: Any
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(indices into requests, edits [b, 3, H, W])`` per shape batch (``kwargs``: :func:`edit_batch`'s)."""
    for batch in shape_batches(requests, batch_size):
        pred = edit_batch(editor, [requests[i] for i in batch], seed=seed, **kwargs)
        log.info("edited %d items at %dx%d", len(batch), *requests[batch[0]].hw)
        yield batch, pred


def run_edits(
    editor: Any, requests: Sequence[EditRequest], *, seed: int, batch_size: int = 8, **kwargs: Any
) -> list[torch.Tensor]:
    """Every request's edit ``[3, H, W]`` in [-1, 1], in request order."""
    out: list[torch.Tensor | None] = [None] * len(requests)
    for batch, pred in iter_edits(editor, requests, seed=seed, batch_size=batch_size, **kwargs):
        for j, i in enumerate(batch):
            out[i] = pred[j]
    return out  # type: ignore[return-value]
