"""``rededit-data``: offline data commands (synth, validate, buckets, encode-text).

Each command lives in its own module ``rededit.cli.data_<name>`` exposing ``add_parser(subparsers)``,
which registers the sub-command and sets ``func(args) -> int`` (the exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("synth", "validate", "buckets", "encode_text")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rededit-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"rededit.cli.data_{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
