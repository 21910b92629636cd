"""``rededit-edit``: edit an image (or generate one) with a trained editor.

    rededit-edit --checkpoint outputs/demo/export --image A.png [--image B.png ...] \\
        --instruction "Replace the red heart with a white crescent." --out edited.png [--steps 8 --cfg 1 --seed 0]
    rededit-edit --checkpoint outputs/demo/export --instruction "A cyan cross on a grey background" --out t2i.png

``--checkpoint`` accepts

* an export folder written by :func:`rededit.stages.checkpoints.export_editor` (``rededit.yaml``,
  ``transformer/`` with the EMA weights when the run had EMA, ``backbone_raw.safetensors``);
* a Lightning ``.ckpt`` file or a run folder (``config.yaml`` beside ``checkpoints/``): the EMA weights
  stored by the EMA callback are used when present, ``--raw`` takes the raw ones.

VAE, text encoder and stage are rebuilt from the saved (resolved) Hydra config, so the editor runs with
exactly the components it was trained with. Picture 1 is the first ``--image`` (the sequence layout of
:class:`rededit.models.backbone.EditBackbone`); without ``--image`` the instruction is a text-to-image prompt.

Image sizes: the backbone needs sides that are multiples of ``m = vae.downsample × backbone.patch_size``
(one token per ``m × m`` pixels). Every input image is cover-resized and centre-cropped
(:func:`rededit.data.images.resize_to_bucket`) to its own size rounded to ``m``; an image whose area
exceeds the cap is first scaled down (aspect kept) to the cap. The cap is the largest area of the
training bucket set (``data.buckets`` of the saved config: the resolutions the editor has seen; 64² px for
the CPU demo) or ``--max-area``; without either, 1024² px (report Table 1, SFT). The output size defaults
to Picture 1's (adjusted) size; ``--height/--width`` override it (rounded to ``m``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from rededit.utils.logging import get_logger
from rededit.utils.safe_load import UnsafeCheckpointError
from rededit.utils.trusted_config import UntrustedConfigError, load_trusted_config

log = get_logger(__name__)

RUN_CONFIG = "config.yaml"
DEFAULT_T2I_SIZE = 64
DEFAULT_MAX_AREA = 1024 * 1024


class EditorLoadError(Exception):
    """The checkpoint path cannot be turned into an editor (missing files, no saved config)."""


# --------------------------------------------------------------------------------------------- loading
def _find_config(checkpoint: Path) -> Path:
    """The resolved config saved with a checkpoint: ``<run>/config.yaml`` for ``<run>/checkpoints/x.ckpt``."""
    candidates = (
        [checkpoint / RUN_CONFIG]
        if checkpoint.is_dir()
        else [checkpoint.parent / RUN_CONFIG, checkpoint.parent.parent / RUN_CONFIG]
    )
    for c in candidates:
        if c.is_file():
            return c
    raise EditorLoadError(
        f"no saved config for {checkpoint}: looked for {', '.join(str(c) for c in candidates)} "
        "(rededit-train writes config.yaml into the run folder; an export folder has rededit.yaml)"
    )


def build_editor_from_config(cfg: DictConfig, *, backbone_node: Any | None = None) -> Any:
    """Instantiate VAE, text encoder and stage from a resolved training config and build the backbone.

    Args:
        cfg: config with ``stage``, ``vae`` and ``text_encoder`` nodes (``stage.backbone`` a ``_partial_``).
        backbone_node: replacement for ``stage.backbone`` (e.g. loading from an export's transformer folder).

    Returns:
        the stage (a :class:`~rededit.stages.base.BaseStage`) with ``configure_model()`` done, in eval mode.
    """
    from hydra.utils import instantiate

    for key in ("stage", "vae"):
        if cfg.get(key) is None:
            raise EditorLoadError(f"the saved config has no `{key}` node; is it a rededit training config?")
    vae = instantiate(cfg.vae)
    text_encoder = instantiate(cfg.text_encoder) if cfg.get("text_encoder") else None
    # init_from points at the previous stage's run, which need not exist where the editor runs; the
    # weights come from this checkpoint anyway.
    overrides: dict[str, Any] = {"vae": vae, "text_encoder": text_encoder, "init_from": None}
    if backbone_node is not None:
        overrides["backbone"] = backbone_node
    stage = instantiate(cfg.stage, **overrides)
    stage.configure_model()
    stage.eval()
    return stage


def load_editor(
    checkpoint: str | os.PathLike, device: str | torch.device = "cpu", *, raw: bool = False
) -> Any:
    """Rebuild an editor for inference (see the module docstring for accepted paths).

    Args:
        checkpoint: export folder, run folder or ``.ckpt`` file.
        device: where to put it.
        raw: use the raw (non-EMA) weights.

    Returns:
        the stage, with :meth:`~rededit.stages.base.BaseStage.generate`, and the attributes
        ``inference_config`` (the saved config), ``checkpoint_path`` and ``weights`` (``"ema"``/``"raw"``).

    Raises:
        EditorLoadError: nothing usable at ``checkpoint``.
    """
    from rededit.stages.checkpoints import EXPORT_CONFIG, EXPORT_EXTRAS, is_export_folder, load_backbone_state

    path = Path(checkpoint)
    if not path.exists():
        raise EditorLoadError(f"checkpoint not found: {path}")
    export = path.is_dir() and is_export_folder(path)
    cfg_path = path / EXPORT_CONFIG if export else _find_config(path)
    try:
        cfg = load_trusted_config(cfg_path)  # a handed folder: no `_target_` outside rededit's own
    except UntrustedConfigError as err:
        raise EditorLoadError(str(err)) from err
    if export and not raw:
        # The EMA (or only) weights are the diffusers folder itself: build the backbone from it directly
        # instead of a random init that load_backbone_state would overwrite (matters for 20B models).
        node = OmegaConf.to_container(cfg.stage.backbone, resolve=True)
        node.update(transformer_config=None, pretrained_path=str(path / "transformer"), subfolder=None)
        stage = build_editor_from_config(cfg, backbone_node=node)
        if (path / EXPORT_EXTRAS).is_file():  # backbone parts outside transformer/ (FireEdit options)
            from safetensors.torch import load_file

            stage.backbone.load_state_dict({**stage.backbone.state_dict(), **load_file(path / EXPORT_EXTRAS)})
        weights = (path / "WEIGHTS").read_text().strip() if (path / "WEIGHTS").is_file() else "ema"
    else:
        if not export:
            from rededit.stages.checkpoints import resolve_checkpoint

            try:
                resolve_checkpoint(path)
            except FileNotFoundError as err:
                raise EditorLoadError(str(err)) from err
        stage = build_editor_from_config(cfg)
        try:
            state, weights = load_backbone_state(path, use_ema=not raw)
        except UnsafeCheckpointError as err:
            raise EditorLoadError(str(err)) from err
        stage.backbone.load_state_dict(state, strict=True)
    stage.to(device)
    stage.inference_config = cfg
    stage.checkpoint_path = str(path)
    stage.weights = weights
    log.info("loaded the %s editor from %s (config %s)", weights, path, cfg_path)
    return stage


# ------------------------------------------------------------------------------------------------ sizes
def size_multiple(editor: Any) -> int:
    """``m = vae.downsample × backbone.patch_size``: image sides must be multiples of it."""
    return int(editor.vae.downsample) * int(editor.backbone.patch_size)


def bucket_max_area(cfg: DictConfig | None) -> int | None:
    """Largest pixel area of the config's training bucket set (``data.buckets``), or None."""
    node = OmegaConf.select(cfg, "data.buckets") if cfg is not None else None
    if node is None:
        return None
    from rededit.data.buckets import ResolutionSet

    res = ResolutionSet.from_config(OmegaConf.to_container(node, resolve=True)).resolutions
    return int((res[:, 0] * res[:, 1]).max())


def fit_size(height: int, width: int, multiple: int, max_area: int | None) -> tuple[int, int]:
    """``(h, w)``: scaled down (aspect kept) to at most ``max_area`` pixels, then rounded to ``multiple``.

    Rounding is to the nearest multiple (at least one), except that a capped size is floored so the area
    stays within the cap.
    """
    h, w = float(height), float(width)
    capped = max_area is not None and h * w > max_area
    if capped:
        s = math.sqrt(max_area / (h * w))
        h, w = h * s, w * s
    rnd = math.floor if capped else round
    return max(1, rnd(h / multiple)) * multiple, max(1, rnd(w / multiple)) * multiple


def image_tensor(img: Image.Image, height: int, width: int) -> torch.Tensor:
    """PIL image → ``[1, 3, height, width]`` in [-1, 1] after cover-resize + centre-crop."""
    from rededit.data.images import resize_to_bucket, to_tensor

    return to_tensor(resize_to_bucket(img.convert("RGB"), height, width)).unsqueeze(0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] → RGB PIL image."""
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), mode="RGB")


def save_image(img: Image.Image, out: str | os.PathLike) -> Path:
    """Write ``img`` atomically; the format follows the suffix (PNG when unknown)."""
    from rededit.utils.io import atomic_path

    out = Path(out)
    fmt = Image.registered_extensions().get(out.suffix.lower(), "PNG")
    with atomic_path(out) as tmp:
        img.save(tmp, format=fmt)
    return out


# ------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rededit-edit",
        description="Edit images (Picture 1 = first --image) or generate one (no --image) with a rededit editor.",
    )
    p.add_argument("--checkpoint", required=True, help="export folder, run folder or .ckpt file")
    p.add_argument("--image", action="append", default=[], help="input image; repeat for Picture 2, 3, ...")
    p.add_argument("--instruction", required=True, help="edit instruction (or T2I prompt without --image)")
    p.add_argument("--out", required=True, help="output image path (.png, .jpg, ...)")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the stage's sample_steps)")
    p.add_argument("--cfg", type=float, default=None, help="true-CFG scale (default: the stage's cfg_scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--negative-prompt", default=None, help="text of the CFG negative branch (default: stage's)"
    )
    p.add_argument("--height", type=int, default=None, help="output height (default: Picture 1's, or 64)")
    p.add_argument("--width", type=int, default=None, help="output width (default: Picture 1's, or 64)")
    p.add_argument("--max-area", type=int, default=None, help="pixel-area cap (default: training buckets)")
    p.add_argument("--raw", action="store_true", help="use the raw instead of the EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 on bad inputs, with a message and no traceback)."""
    parser = _parser()
    args = parser.parse_args(argv)
    from rededit.data.images import ImageDecodeError, load_image

    if not Path(args.checkpoint).exists():
        parser.error(f"--checkpoint {args.checkpoint}: no such file or folder")
    for img in args.image:
        if not Path(img).is_file():
            parser.error(f"--image {img}: no such file")
    for name in ("steps", "height", "width", "max_area"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    try:
        images = [load_image(str(Path(p).resolve()), "/") for p in args.image]
    except ImageDecodeError as err:
        parser.error(str(err))
    from hydra.errors import InstantiationException

    try:
        editor = load_editor(args.checkpoint, args.device, raw=args.raw)
    except (EditorLoadError, FileNotFoundError, ValueError, InstantiationException) as err:
        parser.error(f"--checkpoint: {err}")

    m = size_multiple(editor)
    max_area = args.max_area or bucket_max_area(editor.inference_config) or DEFAULT_MAX_AREA
    ref_sizes = [fit_size(im.height, im.width, m, max_area) for im in images]
    if ref_sizes:
        height, width = ref_sizes[0]
    else:
        height = width = DEFAULT_T2I_SIZE
    if args.height is not None or args.width is not None:
        height, width = fit_size(args.height or height, args.width or width, m, None)
    references = [image_tensor(im, h, w) for im, (h, w) in zip(images, ref_sizes)]
    log.info(
        "%s at %dx%d (HxW; sides multiples of %d), references %s",
        "edit" if references else "text-to-image",
        height,
        width,
        m,
        ref_sizes,
    )
    out = editor.generate(
        references,
        [args.instruction],
        height=height,
        width=width,
        seed=args.seed,
        steps=args.steps,
        cfg_scale=args.cfg,
        negative_prompt=args.negative_prompt,
    )
    path = save_image(tensor_to_pil(out[0]), args.out)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
