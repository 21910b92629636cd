"""Pre-training and Continued Pre-training (report §3.3, §3.4; Table 1).

Pretrain trains on a T2I + editing mixture with the hybrid captions of Table 1 (original metadata and
structured captions, few instructive ones), 384–512 px buckets and the progressive timestep curriculum.
CT is the *same module* with the CT configuration (``experiment=ct``): the 512–1024 bucket set with
ratios 2:1 … 1:2, cluster-balanced sampling and dense (structured) captions. What differs between the two
is data and schedule, not the objective, so there is one class.
"""

from __future__ import annotations

from rededit.stages.base import BaseStage


class PretrainModule(BaseStage):
    """Rectified-flow training on the T2I + edit mixture (the :class:`BaseStage` objective unchanged)."""
