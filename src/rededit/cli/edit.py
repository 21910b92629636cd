"""``rededit-edit``: edit an image (or generate one) with a trained editor.

    rededit-edit --checkpoint outputs/demo/export --image A.png [--image B.png ...] \\
        --instruction "Replace the red heart with a white crescent." --out edited.png [--steps 8 --cfg 1 --seed 0]
    rededit-edit --checkpoint outputs/demo/export --instruction "A cyan cross on a grey background" --out t2i.png

``--checkpoint`` accepts an export folder, a run folder, a ``.ckpt`` file or a diffusers pipeline folder
(:func:`rededit.inference.editor.load_editor`; ``--raw`` takes the raw instead of the EMA weights,
``--dtype`` loads in another dtype). ``--lora PATH[:SCALE]`` (repeatable) applies LoRA files of any format
rededit reads (:func:`rededit.inference.editor.load_loras`: diffusers, ComfyUI, kohya/musubi, PEFT folder), each
at its strength, as if merged into the weights. Picture 1 is the first ``--image`` (the sequence layout of
:class:`rededit.models.backbone.EditBackbone`); without ``--image`` the instruction is a text-to-image prompt.

Image sizes: the backbone needs sides that are multiples of ``m = vae.downsample × backbone.patch_size``
(one token per ``m × m`` pixels). Every input image is cover-resized and centre-cropped
(:func:`rededit.data.images.resize_to_bucket`) to its own size rounded to ``m``; an image whose area
exceeds the cap is first scaled down (aspect kept) to the cap. The cap is the largest area of the
training bucket set (``data.buckets`` of the saved config: the resolutions the editor has seen; 64² px for
the CPU demo) or ``--max-area``; without either, 1024² px (report Table 1, SFT). The edit is generated at
Picture 1's adjusted size and **written at Picture 1's own size** (resized back), so the output can replace
the input; ``--max-area`` writes the generated size instead, and ``--height/--width`` ask for another
output size (generated at it rounded to ``m``, written at exactly it). Text-to-image defaults to 64².

Editors that come from a diffusers pipeline folder (a published Qwen-Image-Edit / FireRed folder, or a full
export of a run that started from one) edit exactly as ``QwenImageEditPlusPipeline`` does
(:mod:`rededit.inference.pipeline_edit`): the same inputs and ``--seed`` give the same image, generated and
written at the pipeline's size (~1024² px at the last image's aspect, or ``--height/--width`` floored to
multiples of 16); ``--max-area`` does not apply to them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from rededit.data.images import ImageDecodeError, load_image
from rededit.data.uri import outside_root_allowed_here
from rededit.inference.edit_loop import EditRequest, edit_batch
from rededit.inference.editor import EditorLoadError, load_editor, load_loras, parse_lora_spec
from rededit.inference.images import image_tensor, save_image, tensor_to_pil
from rededit.inference.pipeline_edit import is_pipeline_editor, pipeline_edit
from rededit.inference.sizing import (
    DEFAULT_MAX_AREA,
    DEFAULT_T2I_SIZE,
    bucket_max_area,
    fit_size,
    size_multiple,
)
from rededit.utils.logging import get_logger

log = get_logger(__name__)


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
    p.add_argument(
        "--max-area",
        type=int,
        default=None,
        help="generate at most this many pixels and write the generated size (default: generate at the "
        "training buckets' largest area and write Picture 1's size)",
    )
    p.add_argument("--raw", action="store_true", help="use the raw instead of the EMA weights")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="load the editor in this dtype (default: its config's; bfloat16 for a pipeline folder)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="for a pipeline folder: a Hydra override of the editor config rededit composes for it, e.g. "
        "backbone=qwen_image_edit_2511 (checks the folder is that variant); repeatable",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="apply a LoRA (diffusers / ComfyUI / kohya .safetensors file, or a PEFT folder) at strength SCALE "
        "(default 1.0); repeatable, all apply together",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 on bad inputs, with a message and no traceback)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).exists():
        parser.error(f"--checkpoint {args.checkpoint}: no such file or folder")
    for img in args.image:
        if not Path(img).is_file():
            parser.error(f"--image {img}: no such file")
    for spec in args.lora:  # before the editor loads (minutes for a 20B model)
        if not parse_lora_spec(spec)[0].exists():
            parser.error(f"--lora {spec}: no such file or folder")
    for name in ("steps", "height", "width", "max_area"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    try:
        with outside_root_allowed_here():  # the user's own command line names these files
            images = [load_image(str(Path(p).resolve()), "/") for p in args.image]
    except ImageDecodeError as err:
        parser.error(str(err))
    from hydra.errors import HydraException, InstantiationException

    try:
        editor = load_editor(
            args.checkpoint, args.device, raw=args.raw, dtype=args.dtype, overrides=args.override
        )
    except (EditorLoadError, FileNotFoundError, ValueError, InstantiationException, HydraException) as err:
        parser.error(f"--checkpoint: {err}")
    try:
        load_loras(editor, args.lora)
    except EditorLoadError as err:
        parser.error(f"--lora: {err}")
    if images and is_pipeline_editor(editor):
        if args.max_area is not None:
            parser.error(
                "--max-area: a pipeline editor generates at QwenImageEditPlusPipeline's size; use --height/--width"
            )
        edit = pipeline_edit(
            editor,
            images,
            args.instruction,
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            cfg_scale=args.cfg,
            seed=args.seed,
            height=args.height,
            width=args.width,
        )
        path = save_image(tensor_to_pil(edit, (0.0, 1.0)), args.out)
        log.info("wrote %s (%dx%d, as QwenImageEditPlusPipeline sizes it)", path, *edit.shape[-2:])
        return 0

    m = size_multiple(editor)
    max_area = args.max_area or bucket_max_area(editor.inference_config) or DEFAULT_MAX_AREA
    ref_sizes = [fit_size(im.height, im.width, m, max_area) for im in images]
    if ref_sizes:
        height, width = ref_sizes[0]
        out_hw = (images[0].height, images[0].width)
    else:
        height = width = DEFAULT_T2I_SIZE
        out_hw = (height, width)
    # The output keeps Picture 1's size: a user edits *their* image and expects it back at its size (to
    # replace the input, stack it with masks or layers). The edit itself is generated at Picture 1's size
    # rounded to m and capped to the training buckets' largest area, then resized back: generating at the
    # input's own size would leave the resolutions the editor was trained on (quality drops) and grow memory
    # with the photo (a 12 MP photo is ~47k tokens at m = 16). diffusers' QwenImageEditPlusPipeline likewise
    # generates at a size of its own (~1024² px at the input's aspect). rededit-eval does not go through this
    # CLI and keeps its bucket sizes (the resolutions every benchmark number is measured at).
    if args.max_area is not None:
        out_hw = (height, width)  # the user asked for the generation size
    if args.height is not None or args.width is not None:
        out_hw = (args.height or out_hw[0], args.width or out_hw[1])
        height, width = fit_size(out_hw[0], out_hw[1], m, None)
    references = [image_tensor(im, h, w)[0] for im, (h, w) in zip(images, ref_sizes)]
    log.info(
        "%s generated at %dx%d (HxW; sides multiples of %d), references %s; written at %dx%d",
        "edit" if references else "text-to-image",
        height,
        width,
        m,
        ref_sizes,
        *out_hw,
    )
    request = EditRequest(id="", text=args.instruction, references=references, hw=(height, width))
    out = edit_batch(
        editor,
        [request],
        seed=args.seed,
        steps=args.steps,
        cfg_scale=args.cfg,
        negative_prompt=args.negative_prompt,
    )
    result = tensor_to_pil(out[0])
    if result.size != (out_hw[1], out_hw[0]):
        result = result.resize((out_hw[1], out_hw[0]), Image.Resampling.LANCZOS)
    path = save_image(result, args.out)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
