"""Map-style dataset over a manifest: loads one sample at the resolution its bucket serves it at.

The batch sampler yields :class:`SampleKey` objects rather than bare row numbers, so each sample
knows the (epoch, step) it is drawn for and the exact (h, w) of every image position in its bucket
(a sample merged into a neighbouring bucket is served at that bucket's resolution). Every image is
scale-to-cover resized and centre-cropped to its bucket shape (the crop eq. (1) minimises), and the
same transform is applied to coordinates (face landmarks, object boxes) and to the edit mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow.compute as pc
import torch
from torch.utils.data import Dataset

from rededit.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    load_image,
    resize_to_bucket,
    to_tensor,
    transform_boxes,
    transform_points,
)
from rededit.data.manifest import Manifest
from rededit.data.text_choice import TextMix, choose_text
from rededit.utils.seeding import numpy_rng


class SampleKey(NamedTuple):
    """What the batch sampler hands the dataset for one sample."""

    row: int
    epoch: int
    step: int
    target_hw: tuple[int, int]
    ref_hws: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class SkippedSample:
    """Placeholder for a sample whose images could not be read; collation drops and counts it."""

    id: str
    column: str
    reason: str
    key: SampleKey | None = None  # what the sampler asked for (a substitute is served at its shapes)


def object_boxes_at(row: dict[str, Any], dst_hw: tuple[int, int]) -> torch.Tensor | None:
    """A row's ``object_boxes`` (target pixels as the manifest states them) mapped through the cover-crop to
    ``dst_hw``: ``[O, 4]`` float32, or None when the row has none. Training, the demo report and DPO pair
    making map them alike, so region tokens see the same boxes everywhere."""
    if not row.get("object_boxes"):
        return None
    boxes = np.asarray(row["object_boxes"], dtype=np.float32).reshape(-1, 4)
    boxes = transform_boxes(boxes, (int(row["target_height"]), int(row["target_width"])), dst_hw)
    return torch.from_numpy(np.ascontiguousarray(boxes, np.float32))


class EditDataset(Dataset):
    """One manifest row → a dict of tensors at its bucket resolution.

    Returned keys: ``id``, ``task``, ``row``, ``epoch``, ``step``, ``text`` (chosen per Table 1 / §2.5.2,
    before Stochastic Instruction Alignment), ``text_column``, ``lang``, ``target`` ``[3, H, W]`` in
    [-1, 1], ``references`` list of ``[3, H_k, W_k]``, ``reference_uris``, and when present ``edit_mask``
    ``[1, H, W]`` in {0, 1}, ``rejected`` ``[3, H, W]`` (DPO pairs), ``ocr_target``, ``face_landmarks`` ``[F, 5, 2]`` and ``object_boxes``
    ``[O, 4]`` in bucket pixels.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        text_mix: TextMix | None = None,
        seed: int = 0,
        max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.manifest = manifest
        self.text_mix = text_mix or TextMix()
        self.seed = seed
        self.max_image_pixels = max_image_pixels

    def __len__(self) -> int:
        return len(self.manifest)

    def substitute(self, key: SampleKey, attempts: int = 32) -> dict[str, Any] | None:
        """A readable sample from another row, served at ``key``'s shapes, epoch and step; None if ``attempts``
        candidates all fail.

        Used when every sample of a batch was unreadable (e.g. one sample per step): an empty batch would
        leave this rank out of the step's collectives while the other ranks wait. Candidates are rows with as
        many references as ``key`` asks for, in an order drawn from (seed, epoch, step, row), so every run
        picks the same one.
        """
        n_refs = len(key.ref_hws)
        rng = numpy_rng(self.seed, "substitute", key.epoch, key.step, key.row)
        counts = pc.fill_null(pc.list_value_length(self.manifest.table.column("references")), 0).to_numpy()
        candidates = np.flatnonzero(counts == n_refs)
        candidates = candidates[candidates != key.row]
        for row in rng.permutation(candidates)[:attempts].tolist():
            sample = self[key._replace(row=int(row))]
            if not isinstance(sample, SkippedSample):
                return sample
        return None

    def __getitem__(self, key: SampleKey) -> dict[str, Any] | SkippedSample:
        row = self.manifest.row(key.row)
        root = self.manifest.root
        column = "target"
        cap = self.max_image_pixels
        try:
            # The manifest's sizes chose the bucket: an image of another size is a bad sample, not a silent
            # resize into the wrong bucket.
            size = (row["target_width"], row["target_height"])
            target = load_image(row["target"], root, max_pixels=cap, expect_size=size)
            refs = []
            ref_sizes = list(zip(row.get("reference_widths") or [], row.get("reference_heights") or []))
            if len(ref_sizes) != len(row["references"]):
                ref_sizes = [None] * len(row["references"])  # validate reports the mismatch
            for k, (uri, wh) in enumerate(zip(row["references"], ref_sizes)):
                column = f"references[{k}]"
                refs.append(load_image(uri, root, max_pixels=cap, expect_size=wh))
            mask = None
            if row.get("edit_mask"):
                column = "edit_mask"
                mask = load_image(row["edit_mask"], root, mode="L", max_pixels=cap)
            rejected = None
            if row.get("rejected"):
                column = "rejected"
                rejected = load_image(row["rejected"], root, max_pixels=cap)
        except (FileNotFoundError, ImageDecodeError, ValueError) as err:
            return SkippedSample(id=row["id"], column=column, reason=str(err), key=key)
        if len(refs) != len(key.ref_hws):
            raise ValueError(
                f"row {row['id']!r}: sampler served {len(key.ref_hws)} reference shapes for {len(refs)} references"
            )

        th, tw = key.target_hw
        chosen = choose_text(row, self.text_mix, seed=self.seed, epoch=key.epoch)
        src_hw = (target.height, target.width)
        sample: dict[str, Any] = {
            "id": row["id"],
            "task": row["task"],
            "row": key.row,
            "epoch": key.epoch,
            "step": key.step,
            "text": chosen.text,
            "text_column": chosen.column,
            "lang": chosen.lang,
            "target": to_tensor(resize_to_bucket(target, th, tw)),
            "references": [to_tensor(resize_to_bucket(r, h, w)) for r, (h, w) in zip(refs, key.ref_hws)],
            "reference_uris": list(row["references"]),
            "ocr_target": row.get("ocr_target"),
        }
        if rejected is not None:
            # The dispreferred edit (DPO pairs) is served at exactly the target's bucket shape.
            sample["rejected"] = to_tensor(resize_to_bucket(rejected, th, tw))
        if mask is not None:
            # Nearest keeps the mask binary; the cover-crop is the same as the target's.
            mask_img = resize_to_bucket(mask, th, tw, resample="nearest")
            sample["edit_mask"] = (to_tensor(mask_img, mask=True) > 0.5).float()
        if row.get("face_landmarks"):
            pts = np.asarray(row["face_landmarks"], dtype=np.float32).reshape(-1, 2)
            pts = transform_points(pts, src_hw, (th, tw))
            sample["face_landmarks"] = torch.from_numpy(np.ascontiguousarray(pts, np.float32)).reshape(
                -1, 5, 2
            )
        boxes = object_boxes_at(row, (th, tw))  # the decoded size is the stated one (load_image checked it)
        if boxes is not None:
            sample["object_boxes"] = boxes
        return sample
