"""Config mistakes caught before a run starts, each reported as one sentence naming the key (issue 17 §4).

Hydra passes ``trainer.max_steps=abc`` or ``optimizer.lr=fast`` through as strings, and they used to surface
deep inside Lightning or torch as a ``TypeError`` traceback; a missing manifest surfaced as a bare
``FileNotFoundError``. :func:`check_train_config` and :func:`check_eval_config` look at the composed config
first and raise :class:`ConfigError`, which the entry points print as ``error: ...`` with exit code 2.

:func:`remove_unstarted_run` takes back the files a training run wrote when it fails before its first
optimizer step, so a typo does not leave a half-made run folder behind.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rededit.utils.offline import require_local_folder
from rededit.utils.run_lock import LOCK_NAME

EXIT_BAD_CONFIG = 2


class ConfigError(ValueError):
    """A config value that cannot work, named by its key (printed without a traceback, exit code 2)."""


# (key, accepted kinds, lower bound or None); None values are allowed where "none" is listed.
_NUMBERS: tuple[tuple[str, tuple[str, ...], float | None], ...] = (
    ("trainer.max_steps", ("int",), -1),
    ("trainer.max_epochs", ("int", "none"), -1),
    ("trainer.accumulate_grad_batches", ("int",), 1),
    ("trainer.log_every_n_steps", ("int",), 1),
    ("optimizer.lr", ("float",), 0),
    ("optimizer.weight_decay", ("float", "none"), 0),
    ("data.token_budget", ("int",), 1),
    ("data.num_workers", ("int",), 0),
    ("stage.warmup_steps", ("int",), 0),
    ("stage.min_lr_ratio", ("float",), 0),
    ("seed", ("int",), None),
    ("torch_threads", ("int", "none"), 1),
)


def _kind_ok(value: Any, kinds: Sequence[str]) -> bool:
    if value is None:
        return "none" in kinds
    if isinstance(value, bool):
        return False
    if "int" in kinds and isinstance(value, int):
        return True
    return "float" in kinds and isinstance(value, (int, float))


def _select(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """``(present, value)`` of a dotted key; interpolations are resolved (their own errors name the key)."""
    node = OmegaConf.select(cfg, key, default="__absent__", throw_on_missing=False)
    return (not (isinstance(node, str) and node == "__absent__")), node


def check_numbers(
    cfg: DictConfig, spec: Iterable[tuple[str, tuple[str, ...], float | None]] = _NUMBERS
) -> None:
    """Raise :class:`ConfigError` for the first numeric key of ``spec`` holding a non-number or a value below
    its bound."""
    for key, kinds, low in spec:
        present, value = _select(cfg, key)
        if not present:
            continue
        if not _kind_ok(value, kinds):
            what = " or ".join({"int": "an integer", "float": "a number", "none": "null"}[k] for k in kinds)
            raise ConfigError(f"{key}={value!r}: expected {what}")
        if value is not None and low is not None and value < low:
            raise ConfigError(f"{key}={value!r}: must be at least {low:g}")


def check_manifest(cfg: DictConfig, key: str = "data.manifest") -> None:
    """The training manifest is set and exists, or a sentence says what to pass and how to make one."""
    present, value = _select(cfg, key)
    make = (
        "make one with `rededit-data synth --out DIR` (the synthetic corpus) or the data engine, then pass "
        f"{key}=DIR/manifest.parquet"
    )
    if not present or value is None or str(value).strip() == "":
        raise ConfigError(f"{key} is not set: training needs a manifest.parquet; {make}")
    path = Path(str(value)).expanduser()
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the working directory {os.getcwd()})"
        hint = " (a folder: pass its manifest.parquet)" if path.is_dir() else ""
        raise ConfigError(f"{key}={value}: no such file{where}{hint}; {make}")


# Trainer arguments that rededit.train.build passes itself, from their own config group: a value under
# ``trainer.`` would be silently replaced (``+trainer.strategy=ddp`` trained on one process).
TRAINER_KEYS_FROM_GROUPS = {
    "strategy": "strategy=<option> (auto, ddp, fsdp2, hsdp, deepspeed_zero2, ...)",
    "callbacks": "callbacks=<option> or callbacks.<name>.<key>=...",
    "logger": "logger=[csv,wandb] or logger.<name>.<key>=...",
    "plugins": "strategy=<option> (cluster plugins are chosen by rededit)",
}


def check_trainer_keys(cfg: DictConfig) -> None:
    """Refuse ``trainer.<key>`` for the Trainer arguments that come from their own group."""
    trainer = cfg.get("trainer") or {}
    for key, instead in TRAINER_KEYS_FROM_GROUPS.items():
        if key in trainer:
            raise ConfigError(f"trainer.{key} is not read (it would be silently replaced): use {instead}")


# Weight folders a training run reads from disk (rededit never downloads them).
WEIGHT_FOLDER_KEYS = ("backbone.pretrained_path", "vae.path", "text_encoder.path")


def check_weight_folders(cfg: DictConfig, keys: Iterable[str] = WEIGHT_FOLDER_KEYS) -> None:
    """Each weight folder of ``keys`` that the config sets exists, or a sentence names the key (issue 17 §4:
    ``backbone.pretrained_path=/nonexistent`` was a traceback from inside ``fit``, a hub id a DNS lookup)."""
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, default=None, throw_on_missing=False)
        if not isinstance(node, DictConfig):
            continue
        if OmegaConf.is_missing(node, leaf):  # before `in`, which is False for ???
            raise ConfigError(
                f"{key} is not set: pass {key}=<local weights folder> (rededit never downloads weights)"
            )
        if leaf not in node:
            continue
        value = node[leaf]
        if value is None:
            continue
        try:
            require_local_folder(str(value), key)
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None


def check_train_config(cfg: DictConfig) -> None:
    """Everything :func:`rededit.train.run` can check before it writes a file."""
    check_trainer_keys(cfg)
    check_numbers(cfg)
    if cfg.get("data") is not None:
        check_manifest(cfg)
    check_weight_folders(cfg)


def missing_cli_keys(argv: Sequence[str], keys: Iterable[str]) -> list[str]:
    """Keys of ``keys`` that no ``key=value`` override in ``argv`` sets (Hydra flags like ``--help`` or
    ``--cfg`` mean the user is not running anything: then none is missing)."""
    if any(a.startswith("-") for a in argv):
        return []
    given = {a.split("=", 1)[0].lstrip("+~") for a in argv if "=" in a}
    return [k for k in keys if k not in given]


def check_eval_config(cfg: DictConfig) -> None:
    """``rededit-eval``: the benchmark's required fields and the numbers of the sampler."""
    bench = cfg.get("benchmark")
    if bench is not None:
        missing = sorted(OmegaConf.missing_keys(bench))
        if missing:
            keys = ", ".join(k if k.startswith("benchmark.") else f"benchmark.{k}" for k in missing)
            raise ConfigError(f"{keys} not set: the {bench.get('_target_', 'benchmark')} benchmark needs it")
    check_numbers(
        cfg,
        (
            ("sampler.steps", ("int", "none"), 1),
            ("sampler.cfg", ("float", "none"), 0),
            ("sampler.batch_size", ("int",), 1),
            ("sampler.chunk_size", ("int",), 1),
            ("max_items", ("int", "none"), 1),
        ),
    )


def report(err: BaseException, prog: str) -> int:
    """Print ``prog: error: ...`` on stderr; returns the exit code for a bad config."""
    print(f"{prog}: error: {err}", file=sys.stderr)
    return EXIT_BAD_CONFIG


# Files a training run writes into its folder before the first step (Hydra's log and .hydra/, our config,
# the logger's folder); only these are taken back, and only when this process wrote them.
_RUN_FILES = ("config.yaml", "train.log", ".hydra", "logs", "checkpoints")


def checkpoint_names(out_dir: str | os.PathLike) -> list[str]:
    """The entries of a run folder's ``checkpoints/`` (sorted; empty when there is none): a folder holding any
    is an earlier run's work."""
    folder = Path(out_dir) / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def remove_unstarted_run(out_dir: str | os.PathLike, since: float, names: Sequence[str] = _RUN_FILES) -> bool:
    """Remove what a run that never took a step wrote into ``out_dir``: the files ``names`` (default: a training
    run's, :data:`_RUN_FILES`) modified at or after ``since`` (this process's start), then ``out_dir`` itself if
    nothing else is left.

    Nothing is removed when the folder holds a checkpoint (a resumed run's folder is the user's work) or
    anything besides those files and the run lock.

    Parents left empty by that, below the working directory (``outputs/runs/<run_name>`` of a first run),
    are removed too.

    Returns:
        whether ``out_dir`` itself was removed.
    """
    out = Path(out_dir)
    if not out.is_dir():
        return False
    if checkpoint_names(out):
        return False
    if any(p.name not in names and p.name != LOCK_NAME for p in out.iterdir()):
        return False  # an export, a corpus, the user's notes: this folder is not only this run's
    for name in names:
        path = out / name
        if not path.exists():
            continue
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        if any(f.stat().st_mtime < since for f in files):
            continue  # older than this process: not ours
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    try:
        out.rmdir()  # only if empty
    except OSError:
        return False
    # Hydra made the parents too (outputs/runs/<run_name>/): take back those left empty, below the cwd.
    cwd, parent = Path.cwd().resolve(), out.resolve().parent
    while parent != cwd and cwd in parent.parents:
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break
        parent = parent.parent
    return True
