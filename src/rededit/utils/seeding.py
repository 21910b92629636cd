"""Deterministic randomness: every stochastic choice derives from explicit parts such as
(seed, epoch, step, rank, sample id), never from process-global RNG state.

A hash (not ``hash()``, which is salted per process) turns the parts into a 64-bit seed, so the
same parts give the same stream on every rank, worker and machine.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """Stable 63-bit seed from any mix of ints, floats and strings."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        data = repr(part).encode("utf-8")
        h.update(struct.pack("<I", len(data)))
        h.update(data)
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


def numpy_rng(*parts: object) -> np.random.Generator:
    """``numpy`` generator seeded from ``derive_seed(*parts)``."""
    return np.random.default_rng(derive_seed(*parts))


def torch_generator(*parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    """``torch.Generator`` seeded from ``derive_seed(*parts)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*parts))
    return gen
