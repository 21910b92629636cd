"""``rededit-memory``: parameter, gradient, optimizer-state and activation bytes per GPU of a training config.

    rededit-memory experiment=demo_sft adapter=lora
    rededit-memory backbone=qwen_image adapter=lora adapter.quantize=int8_weight_only backbone.block_swap=40 \\
        trainer=gpu memory.image_tokens=8192
    rededit-memory backbone=qwen_image optimizer=adamw8bit strategy=fsdp2 trainer.devices=8

The same overrides as ``rededit-train`` (``conf/memory.yaml`` = ``conf/train.yaml`` + the step's shapes); the
backbone is built on the ``meta`` device, so a 20B config needs no weights (:mod:`rededit.stages.memory`).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from rededit.cli import help as entry_help
from rededit.stages.memory import estimate
from rededit.utils.paths import CONF_DIR

entry_help.register()  # `--help` lists this entry point's groups (conf/hydra/help/rededit.yaml)


@hydra.main(config_path=str(CONF_DIR), config_name="memory", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(estimate(cfg).table())  # the command's output


if __name__ == "__main__":
    main()
