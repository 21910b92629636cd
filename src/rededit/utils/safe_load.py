"""Reading pickles that third-party checkpoint formats force on us, without running code from them.

rededit writes safetensors and loads ``.ckpt`` files with ``torch.load(weights_only=True)``. Two formats it
must read still go through plain pickle inside their libraries:

* torch's distributed checkpoints (DCP: FSDP2/HSDP runs) keep their ``.metadata`` as a plain pickle and
  load non-tensor entries with ``torch.load(weights_only=False)``;
* DeepSpeed's ZeRO converters ``torch.load(weights_only=False)`` every state file.

A checkpoint folder may come from anyone, and unpickling runs whatever callable the file names. Python's
documented answer ("restricting globals", :class:`RestrictedUnpickler`) and torch's own switch that turns
every ``torch.load`` into a weights-only load (:func:`forced_weights_only`) close both paths.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterator
from typing import IO, Any

_FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_NO_FORCE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asks to build an object outside the allow-list of its format."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only the globals ``allowed(module, name)`` accepts (others: refused).

    The check happens before the global is imported, so a refused file runs none of its code.
    """

    def __init__(self, file: IO[bytes], allowed: Callable[[str, str], bool], source: str) -> None:
        super().__init__(file)
        self._allowed = allowed
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if not self._allowed(module, name):
            raise UnsafeCheckpointError(
                f"{self._source}: refused to load `{module}.{name}` — not an object this checkpoint format "
                "contains (a crafted file may run code through it); the file was not loaded"
            )
        return super().find_class(module, name)


def restricted_load(path: str | os.PathLike, allowed: Callable[[str, str], bool]) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, allowed, str(path)).load()


@contextlib.contextmanager
def forced_weights_only() -> Iterator[None]:
    """Every ``torch.load`` inside the block loads weights only, even one that asks ``weights_only=False``.

    torch reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` at each call; a refused global raises
    ``pickle.UnpicklingError`` naming it. The previous environment is restored on exit.
    """
    saved = {k: os.environ.get(k) for k in (_FORCE_ENV, _NO_FORCE_ENV)}
    os.environ[_FORCE_ENV] = "1"
    os.environ.pop(_NO_FORCE_ENV, None)  # both set is an error in torch; ours wins inside the block
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
