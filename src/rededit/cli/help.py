"""``--help`` of each Hydra entry point lists that entry point's own config groups.

Hydra's built-in ``$APP_CONFIG_GROUPS`` lists every folder of the config tree, so ``rededit-train --help``
showed the evaluation benchmarks and the data-engine pipelines. ``conf/hydra/help/rededit.yaml`` asks the
resolver below instead: the groups named in the primary config's defaults list (``train.yaml``,
``eval.yaml``), their nested groups (``data/buckets``), and the groups an entry point adds with ``+group=``.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from rededit.utils.paths import CONF_DIR

# Groups added on the command line with ``+group=option`` (not in the primary defaults list).
ADDED_GROUPS = {"train": ("ablation",)}
# Folders of shared fragments that stage files include themselves; not a user choice.
INTERNAL = {"stage/shared"}


def _default_groups(primary: str, conf_dir: Path) -> dict[str, str]:
    """Groups of ``<primary>.yaml``'s defaults list (``override``/``optional`` and ``/`` removed) → how the
    command line names them (``eval/benchmark@benchmark``: the package is part of the override)."""
    defaults = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{primary}.yaml")).get("defaults", [])
    out = {}
    for entry in defaults:
        if isinstance(entry, str) and (conf_dir / f"{entry}.yaml").is_file():
            out.update(
                _default_groups(entry, conf_dir)
            )  # a primary built on another (memory.yaml on train.yaml)
            continue
        if not isinstance(entry, dict):
            continue  # _self_ or a plain config name
        (key,) = entry
        name = key.split()[-1].lstrip("/")
        group = name.split("@")[0]
        if group != "hydra" and not group.startswith("hydra/"):
            out[group] = name
    return out


def groups_help(primary: str, conf_dir: Path = CONF_DIR) -> str:
    """One line per config group of ``<primary>.yaml``: ``group: option, option`` (``+group`` when added)."""
    top = _default_groups(primary, conf_dir)
    top |= {g: f"+{g}" for g in ADDED_GROUPS.get(primary, ())}
    groups = dict(top)
    for group in top:  # nested groups one level down (data/buckets under data)
        folder = conf_dir / group
        if folder.is_dir():
            for sub in folder.iterdir():
                if sub.is_dir() and f"{group}/{sub.name}" not in INTERNAL:
                    groups.setdefault(f"{group}/{sub.name}", f"{group}/{sub.name}")
    lines = []
    for group, label in sorted(groups.items()):
        options = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
        if options:
            lines.append(f"{label}: {', '.join(options)}")
    return "\n".join(lines)


def register() -> None:
    """Make ``${rededit.help_groups:<primary>}`` available to the help template (idempotent)."""
    if not OmegaConf.has_resolver("rededit.help_groups"):
        OmegaConf.register_new_resolver("rededit.help_groups", lambda primary: groups_help(str(primary)))
