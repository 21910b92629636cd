"""Lightning callbacks: thin adapters that run pure parts from the trainer's hooks.

EMA of the backbone (:mod:`.ema`, math in :mod:`rededit.models.ema`), the NaN guard, preemption handling
(save and exit on SIGTERM/SIGUSR), the appending CSV logger and the sample grids written during training
(:mod:`.sample_images`, through the demo report's edit and scoring code).

May import: every layer below the entry points (``eval``, ``datagen``, ``inference``, ``stages``, ... ``utils``).
"""
