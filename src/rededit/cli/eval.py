"""``rededit-eval``: edit a benchmark with a checkpoint, score the edits, write a reproducible report.

    rededit-eval checkpoint=outputs/demo/export benchmark.manifest_path=outputs/demo/corpus/manifest.parquet \\
        out_dir=outputs/demo/eval sampler.seeds=[0,1,2]
    rededit-eval checkpoint=runs/sft/last.ckpt raw=true eval/benchmark@benchmark=redbench benchmark.folder=/data/redbench \\
        out_dir=outputs/eval/redbench ocr=rapidocr

Hydra config: ``conf/eval.yaml``; benchmark nodes in ``conf/eval/benchmark/``. What it does and writes:
:mod:`rededit.eval.harness`.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from rededit.eval.harness import evaluate
from rededit.utils.paths import CONF_DIR


def main() -> None:
    """Console entry point (``rededit-eval``; Hydra parses the command line)."""

    @hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")
    def _run(cfg: DictConfig) -> None:
        result = evaluate(cfg)
        sys.stdout.write(f"rededit-eval: {result['files']['table_md']}\n")

    _run()


if __name__ == "__main__":
    main()
