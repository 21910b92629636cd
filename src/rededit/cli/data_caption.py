"""``rededit-data caption``: run the captioning engine (report §2.5) over a manifest, resumably.

Runs :class:`~rededit.datagen.engine.captioning.CaptionStage` through the data-engine runner (Parquet
partitions, content hashes, ``result.parquet``), so an interrupted run resumes and answers already
obtained come from the on-disk cache. Backends: ``openai`` (any OpenAI-compatible endpoint, e.g. a local
vLLM server), ``transformers`` (a local Qwen2.5-VL folder) or ``none`` (rule-based fallback only).
Exit codes: 0 done, 2 bad arguments or input.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from rededit.datagen.engine.captioning import CaptionStage
from rededit.datagen.engine.runner import run_pipeline
from rededit.scoring.judges.vlm import OpenAICompatibleJudge, TransformersVLMJudge


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "caption",
        help="caption a manifest: structured captions + detailed/concise/user-like instructions (EN/ZH)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--manifest", required=True, help="input manifest.parquet (URIs relative to its folder)")
    p.add_argument("--out", required=True, help="runner output folder (result.parquet, report, cache)")
    p.add_argument("--backend", choices=("openai", "transformers", "none"), default="none")
    p.add_argument("--base-url", default="http://localhost:8000/v1", help="OpenAI-compatible endpoint")
    p.add_argument("--model", default=None, help="served model name (openai) / label (transformers)")
    p.add_argument("--model-path", default=None, help="local Qwen2.5-VL folder (transformers backend)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="env var with the API key (openai)")
    p.add_argument(
        "--rewriter-models",
        type=_csv,
        default=[],
        help="comma list of served models for the concise rewrite (one drawn per row; openai backend)",
    )
    p.add_argument("--languages", type=_csv, default=["en"], help="en,zh")
    p.add_argument(
        "--fields",
        type=_csv,
        default=["caption", "instruction", "instruction_concise", "instruction_user"],
        help="columns to produce",
    )
    p.add_argument("--overwrite", action="store_true", help="regenerate texts that already exist")
    p.add_argument("--fallback", choices=("rule", "none"), default="rule")
    p.add_argument("--drop-on-failure", action="store_true")
    p.add_argument(
        "--help-ratio", type=float, default=0.5, help="share of user-like texts with a help marker"
    )
    p.add_argument(
        "--templates", default=None, help="YAML/JSON file overriding the built-in prompt templates"
    )
    p.add_argument("--cache-dir", default=None, help="answer cache (default <out>/stages/00_caption/cache)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--device", default=None, help="transformers backend device (default cpu)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--partition-rows", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def _backends(args: argparse.Namespace):
    """(backend factory, rewriter factories): ``functools.partial`` objects, built lazily per worker."""
    if args.backend == "none":
        return None, []
    if args.backend == "openai":
        if not args.model:
            raise ValueError("--model is required with --backend openai")

        def make(model: str):
            return functools.partial(
                OpenAICompatibleJudge, args.base_url, model, api_key_env=args.api_key_env,
                max_tokens=args.max_new_tokens, temperature=0.0,
            )  # fmt: skip

        return make(args.model), [make(m) for m in args.rewriter_models]
    if not args.model_path:
        raise ValueError("--model-path is required with --backend transformers")
    if args.rewriter_models:
        raise ValueError("--rewriter-models is only supported with --backend openai")
    return functools.partial(
        TransformersVLMJudge, args.model_path, max_new_tokens=args.max_new_tokens, device=args.device,
        weights_id=args.model,
    ), []  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        if not Path(args.manifest).is_file():
            raise FileNotFoundError(f"manifest not found: {args.manifest}")
        backend, rewriters = _backends(args)
        stage = CaptionStage(
            backend=backend,
            rewriters=rewriters,
            fields=args.fields,
            languages=args.languages,
            overwrite=args.overwrite,
            fallback=args.fallback,
            drop_on_failure=args.drop_on_failure,
            help_ratio=args.help_ratio,
            templates_file=args.templates,
            cache_dir=args.cache_dir,
        )
        result = run_pipeline(
            [stage], args.manifest, args.out, workers=args.workers, partition_rows=args.partition_rows,
            seed=args.seed,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        print(f"rededit-data caption: {e}", file=sys.stderr)
        return 2
    totals: dict[str, int] = {}
    for f in sorted((Path(args.out) / "stages").glob("*_caption/stats/*.json")):
        for k, v in json.loads(f.read_text()).items():
            if isinstance(v, int):
                totals[k] = totals.get(k, 0) + v
    print((result.out_dir / "report.md").read_text(), end="")
    print("caption calls: " + ", ".join(f"{k}={v}" for k, v in sorted(totals.items())))
    print(f"captioned manifest: {result.result_path}")
    return 0
