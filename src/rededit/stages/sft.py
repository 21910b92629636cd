"""Supervised fine-tuning (report §3.5): instruction captions, lower learning rate, warm-up, EMA.

Auxiliary losses plug in through ``auxiliary_losses``: each is a module called as
``loss(batch, parts, stage) -> [B]`` on the flow loss's ingredients (``parts`` holds σ, x_t, v̂, x_0 and
the reference latents) and is added per sample. The identity-consistency loss of §3.7 (eq. 6–8,
:class:`~rededit.losses.consistency.ConsistencyLoss`, ``loss/consistency=face``) is one: eq. 7's
``L_total = L_mse + λ_id(σ)·L_id`` per sample. ``<split>/<name>`` logs each loss's batch mean; a loss that
exposes ``last_stats`` (a dict of scalars) gets those logged as ``<split>/<key>`` too (e.g.
``train/id_face_fraction``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from rededit.stages.base import BaseStage


class SFTModule(BaseStage):
    """:class:`BaseStage` plus optional per-sample auxiliary losses."""

    def __init__(self, *, auxiliary_losses: Mapping[str, nn.Module] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.auxiliary_losses = nn.ModuleDict(dict(auxiliary_losses or {}))

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        per_sample, parts = self.flow_loss(batch)
        split = "train" if self.training else "val"
        for name, loss_fn in self.auxiliary_losses.items():
            extra = loss_fn(batch, parts, self)
            bs = extra.shape[0]
            self.log(f"{split}/{name}", extra.mean(), batch_size=bs)
            for key, value in (getattr(loss_fn, "last_stats", None) or {}).items():
                self.log(f"{split}/{key}", value, batch_size=bs)
            per_sample = per_sample + extra
        return per_sample.mean(), parts
