"""Synthetic edit corpus: model-free template-based synthesis (report §2.3) with §2.5 texts.

``synthesize(out_dir, n, seed)`` writes PNGs and a manifest following :mod:`rededit.data.schema`;
``rededit-data synth`` is its command line.
"""

from rededit.datagen.synth.tasks import BUILDERS, OPT_IN_TASKS, REVERSIBLE, TASKS, Sample, SynthConfig
from rededit.datagen.synth.writer import DEFAULT_TASK_WEIGHTS, generate_sample, synthesize, task_schedule

__all__ = [
    "BUILDERS",
    "DEFAULT_TASK_WEIGHTS",
    "OPT_IN_TASKS",
    "REVERSIBLE",
    "TASKS",
    "Sample",
    "SynthConfig",
    "generate_sample",
    "synthesize",
    "task_schedule",
]
