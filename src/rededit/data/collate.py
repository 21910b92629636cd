"""Collation: Stochastic Instruction Alignment (§3.2 "Collate Shuffle & Drop"), stacking and text conditioning.

Why SIA is drawn per batch: diffusers' Qwen transformer takes one ``img_shapes`` for the whole batch
(docs/architecture.md, traps), so every sample of a batch must keep the same image shape at every position.
The drop set and the permutation of reference positions are therefore drawn once per global step
from (seed, epoch, step) — the same on every rank, so ranks that share a bucket also share the shapes
they feed the model (equal token loads); on top of that each sample shuffles among the positions that share a
resolution, drawn from (seed, step, sample id). Both keep per-position shapes homogeneous. The
instruction's "Picture N" / "图N" mentions are then re-indexed to follow their images, and a dropped
image's mention becomes a neutral phrase (``rededit.data.alignment``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rededit.data.alignment import SIAConfig, reindex, sample_alignment
from rededit.data.dataset import SkippedSample
from rededit.utils.logging import get_logger
from rededit.utils.seeding import numpy_rng

log = get_logger(__name__)


class BadSampleError(RuntimeError):
    """A sample could not be read and the data config says to stop (``on_bad_sample: stop``)."""


def _same_shape_shuffle(order: list[int], shapes: Sequence[tuple[int, int]], rng) -> list[int]:
    """Permute ``order`` only among positions whose (h, w) are equal, so per-position shapes stay fixed."""
    order = list(order)
    groups: dict[tuple[int, int], list[int]] = {}
    for pos, src in enumerate(order):
        groups.setdefault(tuple(shapes[src]), []).append(pos)
    for positions in groups.values():
        if len(positions) > 1:
            picked = [order[p] for p in positions]
            perm = rng.permutation(len(picked))
            for p, j in zip(positions, perm):
                order[p] = picked[j]
    return order


class EditCollator:
    """Turn a list of :class:`~rededit.data.dataset.EditDataset` samples into a batch.

    Batch keys: ``ids``, ``tasks``, ``rows``, ``epoch``, ``step``, ``texts`` (after SIA), ``langs``,
    ``target`` ``[B, 3, H, W]``, ``references`` list of ``[B, 3, H_k, W_k]`` (post-SIA order),
    ``ref_order`` (per sample: original index of the reference at each position), ``edit_mask``
    ``[B, 1, H, W]`` (ones where a sample has no mask) and ``has_edit_mask`` ``[B]``, ``rejected`` ``[B, 3, H, W]`` + ``has_rejected`` ``[B]`` (only when some
    sample has a DPO pair), ``ocr_target``,
    ``face_landmarks`` / ``object_boxes`` (lists, None where absent), ``skipped`` (ids dropped from
    this batch) and, when a text conditioner is set, ``text_emb`` ``[B, L, D]`` + ``text_mask`` ``[B, L]``.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        sia: SIAConfig | None = None,
        text_conditioner: Any | None = None,
        on_bad_sample: str = "skip",
        substitute: Any | None = None,
    ):
        if on_bad_sample not in ("skip", "stop"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'stop', got {on_bad_sample!r}")
        self.seed = seed
        self.sia = sia
        self.text_conditioner = text_conditioner
        self.on_bad_sample = on_bad_sample
        # ``substitute(key)``: a readable sample from another row at ``key``'s shapes (EditDataset.substitute).
        self.substitute = substitute

    def __call__(self, samples: list[dict[str, Any] | SkippedSample]) -> dict[str, Any]:
        skipped = [s for s in samples if isinstance(s, SkippedSample)]
        for s in skipped:
            msg = f"unreadable sample: row {s.id!r} column {s.column!r}: {s.reason}"
            if self.on_bad_sample == "stop":
                raise BadSampleError(msg)
            log.warning(msg + " (skipped)", extra={"all_ranks": True})
        good = [s for s in samples if not isinstance(s, SkippedSample)]
        if not good and self.substitute is not None and skipped[0].key is not None:
            # An empty batch cannot be trained on, and under DDP/FSDP this rank would miss the step's
            # collectives: train on a readable row at the same shapes instead (counted, logged).
            sub = self.substitute(skipped[0].key)
            if sub is not None:
                log.warning(
                    "every sample of the batch was unreadable (%s): training this step on row %r instead",
                    ", ".join(s.id for s in skipped),
                    sub["id"],
                    extra={"all_ranks": True},
                )
                good = [sub]
        if not good:
            raise BadSampleError(
                f"every sample of a batch was unreadable ({', '.join(s.id for s in skipped)}) and no readable "
                "substitute was found; check the manifest with `rededit-data validate`"
            )
        epoch, step = good[0]["epoch"], good[0]["step"]
        texts = [s["text"] for s in good]
        refs_per_sample = [s["references"] for s in good]
        orders = [list(range(len(r))) for r in refs_per_sample]
        num_refs = len(refs_per_sample[0])
        if self.sia is not None and num_refs > 0:
            # ``sample_alignment`` returns the identity for excluded tasks and for texts it cannot re-index.
            batch_order = sample_alignment(
                num_refs,
                seed=self.seed,
                step=step,
                sample_id=f"epoch:{epoch}",
                cfg=self.sia,
                task=good[0]["task"],
                texts=texts,
            )
            shapes = [tuple(r.shape[-2:]) for r in refs_per_sample[0]]
            for i, s in enumerate(good):
                rng = numpy_rng(self.seed, epoch, step, s["id"], "sia-shape")
                orders[i] = _same_shape_shuffle(batch_order, shapes, rng)
                texts[i] = reindex(texts[i], orders[i])
        references = [
            torch.stack([refs_per_sample[i][orders[i][pos]] for i in range(len(good))])
            for pos in range(len(orders[0]))
        ]
        target = torch.stack([s["target"] for s in good])
        has_mask = torch.tensor(["edit_mask" in s for s in good])
        edit_mask = torch.stack([s.get("edit_mask", torch.ones(1, *target.shape[-2:])) for s in good])
        has_rejected = torch.tensor(["rejected" in s for s in good])
        batch: dict[str, Any] = {
            "ids": [s["id"] for s in good],
            "tasks": [s["task"] for s in good],
            "rows": [s["row"] for s in good],
            "epoch": epoch,
            "step": step,
            "texts": texts,
            "langs": [s["lang"] for s in good],
            "target": target,
            "references": references,
            "ref_order": orders,
            "reference_uris": [[s["reference_uris"][j] for j in o] for s, o in zip(good, orders)],
            "edit_mask": edit_mask,
            "has_edit_mask": has_mask,
            "ocr_target": [s.get("ocr_target") for s in good],
            "face_landmarks": [s.get("face_landmarks") for s in good],
            "object_boxes": [s.get("object_boxes") for s in good],
            "skipped": [s.id for s in skipped],
        }
        if has_rejected.any():
            # DPO pairs; zeros where a row has none (``has_rejected`` says which, the stage decides).
            batch["rejected"] = torch.stack([s.get("rejected", torch.zeros_like(s["target"])) for s in good])
            batch["has_rejected"] = has_rejected
        if self.text_conditioner is not None:
            batch["text_emb"], batch["text_mask"] = self.text_conditioner(batch)
        return batch
