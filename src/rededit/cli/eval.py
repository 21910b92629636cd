"""``rededit-eval``: edit a benchmark with a checkpoint, score the edits, write a reproducible report.

    rededit-eval checkpoint=outputs/demo/export benchmark.manifest_path=outputs/demo/corpus/manifest.parquet \\
        out_dir=outputs/demo/eval sampler.seeds=[0,1,2]
    rededit-eval checkpoint=runs/sft/last.ckpt raw=true eval/benchmark@benchmark=redbench benchmark.folder=/data/redbench \\
        out_dir=outputs/eval/redbench ocr=rapidocr
    rededit-eval checkpoint=outputs/demo/export lora=[style.safetensors:0.8,outputs/lora/peft] out_dir=... \\
        benchmark.manifest_path=...

``lora=[PATH[:SCALE], ...]`` applies LoRA files as ``rededit-edit --lora`` does; their hashes and strengths are
pinned in ``generation.json`` and listed in ``metrics.json``.

Hydra config: ``conf/eval.yaml``; benchmark nodes in ``conf/eval/benchmark/``. What it does and writes:
:mod:`rededit.eval.harness`.
"""

from __future__ import annotations

import sys
import time

import hydra
from omegaconf import DictConfig, ListConfig

from rededit.cli import help as entry_help
from rededit.eval.harness import JudgeFailureRateError, MetricUnavailableError, evaluate
from rededit.inference.editor import EditorLoadError, parse_lora_spec
from rededit.scoring.judges.vlm import JudgeUnreachableError
from rededit.utils.config_checks import (
    ConfigError,
    check_eval_config,
    missing_cli_keys,
    remove_unstarted_run,
    report,
)
from rededit.utils.paths import CONF_DIR

PROCESS_START = time.time()  # before Hydra creates out_dir
entry_help.register()


def _check_loras(cfg: DictConfig) -> None:
    """``lora=[PATH[:SCALE], ...]``: a list of existing files or folders, checked before anything is generated
    (their formats are read when the editor loads: :func:`rededit.inference.editor.load_loras`)."""
    specs = cfg.get("lora") or []
    if isinstance(specs, str) or not isinstance(specs, list | ListConfig):
        raise ConfigError(
            f"lora must be a list of PATH[:SCALE], got {specs!r} (e.g. lora=[a.safetensors:0.8])"
        )
    for spec in specs:
        if not parse_lora_spec(str(spec))[0].exists():
            raise ConfigError(f"lora: {spec}: no such file or folder")


def main() -> None:
    """Console entry point (``rededit-eval``; Hydra parses the command line). Missing or malformed settings,
    a configured metric that cannot be built and a judge endpoint that cannot be reached are reported as one
    sentence, exit code 2; a judge failure rate above ``judge.max_failure_rate`` exits 1 after the report."""
    missing = missing_cli_keys(sys.argv[1:], ("checkpoint", "out_dir"))
    if missing:
        err = ConfigError(
            f"missing {' and '.join(f'{k}=' for k in missing)} (checkpoint=<export folder, run folder or .ckpt>, "
            "out_dir=<folder for the edits and the report>)"
        )
        raise SystemExit(report(err, "rededit-eval"))

    @hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        try:
            check_eval_config(cfg)
            _check_loras(cfg)
        except ConfigError as err:
            remove_unstarted_run(cfg.out_dir, PROCESS_START, names=("eval.log", ".hydra"))  # Hydra's log only
            raise SystemExit(report(err, "rededit-eval")) from None
        try:
            result = evaluate(cfg)
        except (MetricUnavailableError, JudgeUnreachableError, EditorLoadError) as err:
            raise SystemExit(report(err, "rededit-eval")) from None
        except JudgeFailureRateError as err:
            print(f"rededit-eval: error: {err}", file=sys.stderr)
            raise SystemExit(1) from None
        sys.stdout.write(f"rededit-eval: {result['files']['table_md']}\n")

    _run()


if __name__ == "__main__":
    main()
