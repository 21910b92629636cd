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

An adapter run's checkpoint (``adapter=lora|lokr|loha``) holds only the adapter (and FireEdit) weights: the base is
rebuilt from the run's config (``backbone``, ``stage.init_from``; checked against the base fingerprint the
checkpoint records) and the export is the adapter layout of ``export_editor`` (base ``transformer/`` + ``adapter/``).
``--merge-adapter`` instead folds the adapter into the base (peft ``merge``) and writes a plain full editor whose
outputs equal the adapted model's:

    rededit-consolidate outputs/runs/sft_lora/<date> --merge-adapter --out merged
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rededit.models import adapters
from rededit.stages.checkpoints import (
    adapter_backbone_from_checkpoint,
    backbone_from_state,
    consolidate_full,
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


def consolidate_to_editor(
    checkpoint: str | Path, out: str | Path, config: str | Path | None = None, *, merge_adapter: bool = False
) -> Path:
    """Export ``checkpoint`` to the editor folder ``out`` (see the module docstring); returns ``out``.

    Args:
        merge_adapter: an adapter run's checkpoint: write the merged full model instead of base + adapter.
    """
    from omegaconf import OmegaConf

    ckpt = resolve_checkpoint(checkpoint)
    config = Path(config) if config else find_config(ckpt)
    cfg = load_trusted_config(config)  # found in (or handed with) a run folder: rededit's targets only
    raw, shadow, step, record = consolidate_full(ckpt)
    if record is None and merge_adapter:
        raise ValueError(f"--merge-adapter: {ckpt} is a full fine-tune's checkpoint (it has no adapter)")
    if record is not None:
        backbone = adapter_backbone_from_checkpoint(cfg, record, raw, source=ckpt)
        ema_state = _adapter_ema_state(backbone, shadow) if shadow else None
        if merge_adapter:
            # transformer/ = base + EMA adapter (when the run had EMA), backbone_raw = base + raw adapter
            if shadow:
                with adapters.swapped_weights(backbone, shadow):
                    ema_state = adapters.merged_state(backbone)
            adapters.merge_adapter(backbone)
            cfg = _without_adapter(cfg)  # the merged editor is a plain one
    else:
        backbone = backbone_from_state(cfg, raw)
        ema_state = None
    if shadow and record is None:
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
    how = "" if record is None else (", adapter merged" if merge_adapter else ", base + adapter")
    log.info("consolidated %s (%s weights%s) into %s", ckpt, "EMA" if ema_state else "raw", how, result)
    return result


def _without_adapter(cfg):
    """The run's config with ``adapter`` (and the stage's copy of it) set to ``none``, and without
    ``stage.preserve_base`` (it needs the adapter: a stage built from the merged editor's config refused it)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.adapter = {"type": "none"}
        if cfg.get("stage") is not None:
            if "adapter" in cfg.stage:
                cfg.stage.adapter = {"type": "none"}
            if "preserve_base" in cfg.stage:
                cfg.stage.preserve_base = None
    return cfg


def _adapter_ema_state(backbone, shadow):
    """The backbone's state dict with the EMA shadow (trainable tensors) in place of the raw ones."""
    state = dict(backbone.state_dict())
    for name, value in shadow.items():
        if name not in state:
            raise KeyError(f"EMA tensor {name!r} is not a backbone weight")
        state[name] = value.to(state[name].dtype)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rededit-consolidate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "checkpoint", help="a .ckpt file, a sharded/DeepSpeed checkpoint folder, or a run folder"
    )
    parser.add_argument("--out", help="editor folder to write (default: <run folder>/export_consolidated)")
    parser.add_argument(
        "--config", help="the run's resolved config.yaml (default: found beside the checkpoint)"
    )
    parser.add_argument(
        "--merge-adapter",
        action="store_true",
        help="an adapter run: write the full transformer with the adapter merged (peft merge)",
    )
    args = parser.parse_args(argv)

    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        config = Path(args.config) if args.config else find_config(ckpt)
        out = Path(args.out) if args.out else config.parent / "export_consolidated"
        consolidate_to_editor(ckpt, out, config, merge_adapter=args.merge_adapter)
    except (UnsafeCheckpointError, UntrustedConfigError, FileNotFoundError, ValueError) as err:
        print(f"rededit-consolidate: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
