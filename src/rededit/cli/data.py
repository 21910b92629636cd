"""``rededit-data``: offline data commands (``rededit-data --help`` lists them; data_scripts/README.md).

Each command lives in its own module ``rededit.cli.data_<name>`` exposing ``add_parser(subparsers)``,
which registers the sub-command and sets ``func(args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rededit.data.uri import allow_outside_root

COMMANDS = (
    # corpus and payloads (§2.3, §3.2)
    "synth",
    "validate",
    "buckets",
    "encode_text",
    "shard",
    "faces",
    # data engine (§2.1-2.6)
    "pipeline",
    "caption",
    "longtail",
    "transform",
    # preference / RL data (§3.6)
    "make_pairs",
    "mine_hard",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rededit-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"rededit.cli.data_{name}").add_parser(sub)
    for command in sub.choices.values():  # every command reads manifests someone may have handed over
        if not any("--allow-outside-root" in a.option_strings for a in command._actions):
            command.add_argument(
                "--allow-outside-root",
                action="store_true",
                help="accept image URIs that are absolute or leave the manifest's folder (refused by default: "
                "a manifest may come from anyone; make-pairs and mine-hard write absolute paths)",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.allow_outside_root:  # process-wide, inherited by workers (rededit.data.uri)
        allow_outside_root(True)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
