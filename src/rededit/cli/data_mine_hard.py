"""``rededit-data mine-hard``: semi-hard sample mining for DiffusionNFT (report §3.6.2).

    rededit-data mine-hard MANIFEST --editor outputs/dpo/export --reward ocr_layout --out data/nft_mined

Samples K edits per row from a previous checkpoint, scores them with a reward (a ``conf/reward`` option name
or a YAML file with a ``_target_``), and keeps rows with a competent mean and an unstable lower tail. Writes
``OUT/manifest.parquet`` (use it as the NFT stage's ``data.manifest``); re-running resumes from
``OUT/scores.jsonl`` and re-applies the thresholds without generating again.
Exit codes: 0 written, 1 no row qualified, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rededit.cli.args import int_at_least
from rededit.datagen.mining import mine_hard
from rededit.inference.editor import EditorLoadError, load_editor
from rededit.utils.paths import CONF_DIR
from rededit.utils.trusted_config import UntrustedConfigError, load_trusted_config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "mine-hard",
        help="keep the 'competent yet high-variance' rows for NFT (reward mean and lower tail per row)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("manifest", help="source manifest.parquet")
    p.add_argument("--out", required=True, help="output folder (manifest.parquet, scores.jsonl)")
    p.add_argument("--editor", required=True, help="export/run folder of the previous (DPO) checkpoint")
    p.add_argument("--reward", required=True, help="conf/reward option name, or a YAML file with a _target_")
    p.add_argument(
        "--trust-target",
        action="append",
        default=[],
        metavar="PREFIX",
        help="also instantiate `_target_`s starting with PREFIX from the --reward file (your own reward "
        "module, e.g. my_lab.rewards.); by default only rededit's classes are",
    )
    p.add_argument("--samples", type=int_at_least(2), default=8, help="K edits per row")
    p.add_argument("--quantile", type=float, default=0.25, help="lower-tail quantile")
    p.add_argument("--min-mean", type=float, default=0.5)
    p.add_argument("--max-mean", type=float, default=0.95)
    p.add_argument("--min-spread", type=float, default=0.1, help="minimum mean − lower quantile")
    p.add_argument("--split", default="train", help="split to mine ('all' for every row)")
    p.add_argument("--steps", type=int_at_least(1), default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int_at_least(1), default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)
    return p


def load_reward(spec: str, trust_prefixes: tuple[str, ...] = ()):
    """A reward from a YAML file (a ``_target_`` node) or a ``conf/reward`` option composed by Hydra (so an
    option's own defaults list, e.g. ``mix``'s parts, is honoured). A file's ``_target_`` must be a rededit
    class or start with one of ``trust_prefixes`` (named by the user on the command line)."""
    from hydra.utils import instantiate

    path = Path(spec)
    if path.is_file():  # a file may have been handed over: rededit's reward classes only
        return instantiate(load_trusted_config(path, trust_prefixes))
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if not (Path(CONF_DIR) / "reward" / f"{spec}.yaml").is_file():
        raise FileNotFoundError(f"reward {spec!r}: neither a YAML file nor a conf/reward option")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"reward={spec}"])
    return instantiate(cfg.reward)


def run(args: argparse.Namespace) -> int:
    try:
        editor = load_editor(args.editor, args.device)
        reward = load_reward(args.reward, tuple(args.trust_target)).to(args.device)
    except (EditorLoadError, FileNotFoundError, UntrustedConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        counts = mine_hard(
            args.manifest,
            args.out,
            editor=editor,
            reward=reward,
            num_samples=args.samples,
            quantile=args.quantile,
            min_mean=args.min_mean,
            max_mean=args.max_mean,
            min_spread=args.min_spread,
            split=None if args.split == "all" else args.split,
            steps=args.steps,
            seed=args.seed,
            limit=args.limit,
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"mine-hard: kept {counts['kept']} ({counts['scored']} scored, {counts['resumed']} resumed) -> {args.out}"
    )
    print(
        f"{args.out}/manifest.parquet names images by absolute path: train on it with data.allow_outside_root=true "
        "(rededit-data validate: --allow-outside-root)"
    )
    return 0
