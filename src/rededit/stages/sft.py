"""Supervised fine-tuning (report §3.5): instruction captions, lower learning rate, warm-up, EMA.

Auxiliary losses (the identity-consistency loss of §3.7, eq. 6–8, arrives in a later issue) plug in
through ``auxiliary_losses``: each is a module called as ``loss(batch, parts, stage) -> [B]`` on the flow
loss's ingredients (``parts`` holds σ, x_t, v̂, x_0 and the reference latents) and is added per sample.
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
        for name, loss_fn in self.auxiliary_losses.items():
            extra = loss_fn(batch, parts, self)
            self.log(f"train/{name}", extra.mean(), batch_size=extra.shape[0])
            per_sample = per_sample + extra
        return per_sample.mean(), parts
