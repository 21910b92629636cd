"""``rededit-consolidate``: turn any training checkpoint into a diffusers editor folder (raw + EMA weights).

    rededit-consolidate outputs/runs/pretrain/<date>                       # its checkpoints/last.ckpt
    rededit-consolidate outputs/runs/pretrain/<date>/checkpoints/step0001000.ckpt --out export_1k

Accepts a Lightning ``.ckpt`` (single device / DDP), a sharded DCP directory (FSDP2 / HSDP; the EMA
shards are gathered too) or a DeepSpeed ZeRO directory (Lightning's ``convert_zero_checkpoint_to_fp32_state_dict``).
Runs in one process on CPU. The run's resolved ``config.yaml`` (found beside the run's ``checkpoints/``
folder unless ``--config`` is given) rebuilds the backbone; the result is what ``export_editor`` writes
after fit: ``transformer/`` (EMA weights when the run had EMA), ``backbone_raw.safetensors``, ``rededit.yaml``;
and, for a run that started from a diffusers pipeline folder (``backbone.pretrained_path``), a complete
pipeline folder (``model_index.json``, the base's vae / text_encoder / tokenizer / processor / scheduler,
hard-linked or copied, ``rededit_export.json``, a model card ``README.md``) that
``QwenImageEditPlusPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rededit.stages.checkpoints import (
    backbone_from_state,
    consolidate_with_step,
    export_card_info,
    export_editor,
    pipeline_base,
    pipeline_sources,
    resolve_checkpoint,
)
from rededit.utils.logging import get_logger
from rededit.utils.safe_load import UnsafeCheckpointError
from rededit.utils.trusted_config import UntrustedConfigError, load_trusted_config

log = get_logger(__name__)


def find_config(checkpoint: Path) -> Path:
    """The run's ``config.yaml``: beside the checkpoint, or in a parent folder (run/checkpoints/x.ckpt)."""
    for folder in (checkpoint, *checkpoint.parents[:3]):
        candidate = folder / "config.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no config.yaml found next to or above {checkpoint}; pass the run's resolved config with --config"
    )


def consolidate_to_editor(checkpoint: str | Path, out: str | Path, config: str | Path | None = None) -> Path:
    """Export ``checkpoint`` to the editor folder ``out`` (see the module docstring); returns ``out``."""
    from omegaconf import OmegaConf

    ckpt = resolve_checkpoint(checkpoint)
    config = Path(config) if config else find_config(ckpt)
    cfg = load_trusted_config(config)  # found in (or handed with) a run folder: rededit's targets only
    raw, shadow, step = consolidate_with_step(ckpt)
    backbone = backbone_from_state(cfg, raw)
    ema_state = None
    if shadow:
        ema_state = dict(raw)
        for name, value in shadow.items():
            if name not in ema_state:
                raise KeyError(f"{ckpt}: EMA tensor {name!r} is not a backbone weight")
            ema_state[name] = value.to(ema_state[name].dtype)
    base = pipeline_base(cfg)
    result = export_editor(
        backbone,
        out,
        config_yaml=OmegaConf.to_yaml(cfg),
        ema_state=ema_state,
        pipeline_from=base,
        components=pipeline_sources(cfg, base) if base is not None else None,
        card=export_card_info(cfg, step=step, run_dir=config.parent) if base is not None else None,
    )
    log.info("consolidated %s (%s weights) into %s", ckpt, "EMA" if ema_state else "raw", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rededit-consolidate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "checkpoint", help="a .ckpt file, a sharded/DeepSpeed checkpoint folder, or a run folder"
    )
    parser.add_argument("--out", help="editor folder to write (default: <run folder>/export_consolidated)")
    parser.add_argument(
        "--config", help="the run's resolved config.yaml (default: found beside the checkpoint)"
    )
    args = parser.parse_args(argv)

    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        config = Path(args.config) if args.config else find_config(ckpt)
        out = Path(args.out) if args.out else config.parent / "export_consolidated"
        consolidate_to_editor(ckpt, out, config)
    except (UnsafeCheckpointError, UntrustedConfigError, FileNotFoundError) as err:
        print(f"rededit-consolidate: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
