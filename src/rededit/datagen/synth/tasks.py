"""Edit templates: one builder per task, each a pure function of a generator (report §2.3).

A builder draws a scene, applies its edit to the scene *description* and renders source and target,
so the target is exact and the edit mask comes from geometry. Reversible edits (add ↔ remove,
colour, replace, background) also describe their inverse (Task Inversion, §2.3): the writer may emit
it as a second row with source and target swapped.

Tasks (``task`` column):

* ``t2i``: 0 references, caption → scene.
* ``add`` / ``remove`` / ``replace`` / ``color``: one object edited; mask = its pixels.
* ``invert``: one named object's colours inverted (every pixel ``v → 255 − v``); mask = its pixels. Opt-in
  (:data:`OPT_IN_TASKS`): in no default mix, so the demo editor has never seen it and an adapter can be
  measured learning it (``experiment=demo_lora``, issue 20).
* ``background``: the background swapped; mask = everything outside objects and the sign.
* ``stylize``: an algorithmic filter over the whole image; ``restore``: degraded → clean.
* ``text``: one word on a sign changed; ``ocr_target`` = the sign's full new text.
* ``viewpoint``: flip / quarter turns / zoom (rotations change the target's aspect ratio).
* ``compose``: objects from Picture 2 (and 3), shown alone on small pictures of other aspect ratios,
  put into Picture 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from rededit.datagen.synth import text as T
from rededit.datagen.synth.filters import DEGRADATIONS, STYLES, apply_style, degrade
from rededit.datagen.synth.scene import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    OBJECT_COLOURS,
    OBJECT_SIZE,
    SHAPES,
    Background,
    Colour,
    Obj,
    Scene,
    SceneSpec,
    colour_distance,
    contrasting,
    foreground_mask,
    full_mask,
    invert_mask,
    object_mask,
    random_background,
    random_objects,
    random_scene,
    random_size,
    render,
    small_size,
    text_mask,
    union,
)

T2I_CAPTION_TYPES: tuple[str, ...] = ("original", "structured", "instructive")
# Table 1's CT column (20/60/20): the stage that mixes T2I with single- and multi-image edits.
T2I_CAPTION_P: tuple[float, ...] = (0.2, 0.6, 0.2)
VIEW_OPS: tuple[str, ...] = ("flip_h", "flip_v", "rot_cw", "rot_ccw", "rot_180", "zoom")


@dataclass(frozen=True)
class SynthConfig:
    """Knobs shared by all builders: the size range (sides are multiples of 32) and the world's complexity.

    The defaults are the full corpus. A simpler world (the CPU demo's, whose README says so) can cap the shapes
    per scene (``max_objects``: fewer distractors for the named object to be told from), draw backgrounds
    from fewer ``backgrounds`` kinds (e.g. solid and gradient only: a removed object's pixels are then
    predictable from its surroundings), scale the shapes (``object_size``, fraction of the short side) and
    the chance of a sign in non-text tasks (``sign_prob``, a multiplier). With the defaults every draw is the
    one the corpus always made, so existing corpora are byte-identical.
    """

    min_side: int = 256
    max_side: int = 512
    max_objects: int = 4
    backgrounds: tuple[str, ...] = BACKGROUND_KINDS
    object_size: tuple[float, float] = OBJECT_SIZE
    sign_prob: float = 1.0

    def __post_init__(self) -> None:
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")
        unknown = sorted(set(self.backgrounds) - set(BACKGROUND_KINDS))
        if not self.backgrounds or unknown:
            raise ValueError(
                f"backgrounds must be a non-empty subset of {BACKGROUND_KINDS}, got {self.backgrounds}"
            )
        lo, hi = self.object_size
        if not 0 < lo <= hi < 1:
            raise ValueError(
                f"object_size must be 0 < low <= high < 1 (of the short side), got {self.object_size}"
            )
        if not 0 <= self.sign_prob <= 1:
            raise ValueError(f"sign_prob must be in [0, 1], got {self.sign_prob}")

    def objects(self, hi: int, reserved: int = 0) -> int:
        """A builder's upper object count, capped by :attr:`max_objects` less ``reserved`` shapes it adds later."""
        return max(0, min(hi, self.max_objects - reserved))

    def spec(self, lo: int, hi: int, text: list[str] | None, reserved: int = 0) -> SceneSpec:
        """A :class:`SceneSpec` with ``lo..hi`` shapes (capped) in this world."""
        hi = self.objects(hi, reserved)
        return SceneSpec(min(lo, hi), hi, text, backgrounds=self.backgrounds, object_size=self.object_size)


@dataclass
class Inverse:
    """The Task Inversion twin of a forward edit: same images swapped, inverse texts."""

    task: str
    template: str
    texts: T.Texts
    target_scene: Scene  # the forward source, described for captions and boxes


@dataclass
class Sample:
    """One generated sample before it is written (images in memory).

    Attributes:
        texts: instruction variants (None for T2I, whose instruction is ``t2i_instruction``).
        target_scene: description of the target (object boxes and captions come from it).
        mask: binary ``L`` edit mask at target size (None for T2I).
        cluster_key: what the semantic cluster id is hashed from (task + main shape / filter / op).
    """

    task: str
    template: str
    cluster_key: str
    target: Image.Image
    references: list[Image.Image]
    target_scene: Scene
    mask: Image.Image | None = None
    texts: T.Texts | None = None
    t2i_instruction: tuple[str, str] | None = None
    caption_type: str = "instructive"
    ocr_target: str | None = None
    style_caption: tuple[str, str] | None = None  # (EN, ZH) style words for a filtered target
    inverse: Inverse | None = None
    source_scene: Scene | None = None  # description of references[0] (None for T2I)


def _size(rng: np.random.Generator, cfg: SynthConfig) -> tuple[int, int, tuple[int, int]]:
    (w, h), ratio = random_size(rng, cfg.min_side, cfg.max_side)
    return w, h, ratio


def _sign(rng: np.random.Generator, p: float, cfg: SynthConfig) -> list[str] | None:
    return [" ".join(T.sign_text(rng))] if rng.random() < p * cfg.sign_prob else None


def _scene_with_objects(
    rng: np.random.Generator, cfg: SynthConfig, w: int, h: int, lo: int, hi: int, sign_p: float
) -> Scene:
    """A scene with at least ``lo`` objects (retries with smaller shapes when the canvas is crowded)."""
    for _ in range(6):
        scene = random_scene(rng, w, h, cfg.spec(lo, hi, _sign(rng, sign_p, cfg)))
        if len(scene.objects) >= lo:
            return scene
    scene = random_scene(rng, w, h, cfg.spec(lo, hi, None))
    if len(scene.objects) < lo:
        raise RuntimeError(f"could not place {lo} objects on a {w}x{h} canvas")
    return scene


def _pick_index(rng: np.random.Generator, scene: Scene) -> int:
    return int(rng.integers(len(scene.objects)))


def _new_colour(rng: np.random.Generator, scene: Scene, old: Obj):
    pool = [
        c
        for c in contrasting(OBJECT_COLOURS, scene.background.colours)
        if c.name != old.colour.name
        and all((o.shape, c.name) != (old.shape, o.colour.name) for o in scene.objects)
    ]
    pool = pool or [c for c in OBJECT_COLOURS if c.name != old.colour.name]
    return pool[int(rng.integers(len(pool)))]


# --- builders -------------------------------------------------------------------------------------


def build_t2i(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    w, h, _ = _size(rng, cfg)
    scene = _scene_with_objects(rng, cfg, w, h, 1, 4, 0.3)
    caption_type = T2I_CAPTION_TYPES[int(rng.choice(len(T2I_CAPTION_TYPES), p=T2I_CAPTION_P))]
    return Sample(
        task="t2i",
        template="t2i_layout",
        cluster_key=scene.objects[0].shape,
        target=render(scene),
        references=[],
        target_scene=scene,
        t2i_instruction=T.t2i_instruction(rng, scene),
        caption_type=caption_type,
        ocr_target=scene.plate.text if scene.plate is not None else None,
    )


def _add_remove(rng: np.random.Generator, cfg: SynthConfig, task: str) -> Sample:
    w, h, _ = _size(rng, cfg)
    full = _scene_with_objects(rng, cfg, w, h, 1, 4, 0.2)
    j = _pick_index(rng, full)
    obj = full.objects[j]
    empty = full.without(j)
    mask = object_mask(full, j)
    pics, pics_inv = T.random_pics(rng, 1), T.random_pics(rng, 1)
    add = T.add_texts(rng, pics if task == "add" else pics_inv, full, obj)
    remove = T.remove_texts(rng, pics if task == "remove" else pics_inv, full, obj)
    img_full, img_empty = render(full), render(empty)
    if task == "add":
        src, tgt, src_scene, tgt_scene, texts = img_empty, img_full, empty, full, add
        inv = Inverse("remove", "remove_object", remove, empty)
    else:
        src, tgt, src_scene, tgt_scene, texts = img_full, img_empty, full, empty, remove
        inv = Inverse("add", "add_object", add, full)
    return Sample(
        task,
        f"{task}_object",
        obj.shape,
        tgt,
        [src],
        tgt_scene,
        mask,
        texts,
        inverse=inv,
        source_scene=src_scene,
    )


def build_add(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    return _add_remove(rng, cfg, "add")


def build_remove(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    return _add_remove(rng, cfg, "remove")


def build_replace(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    w, h, _ = _size(rng, cfg)
    scene = _scene_with_objects(rng, cfg, w, h, 1, 4, 0.2)
    j = _pick_index(rng, scene)
    old = scene.objects[j]
    shapes = [s for s in SHAPES if s != old.shape]
    colour = _new_colour(rng, scene, old) if rng.random() < 0.5 else old.colour
    new = Obj(shapes[int(rng.integers(len(shapes)))], colour, old.box)
    tgt_scene = scene.with_object(j, new)
    mask = union(object_mask(scene, j), object_mask(tgt_scene, j))
    texts = T.replace_texts(rng, T.random_pics(rng, 1), scene, old, new)
    inv = Inverse(
        "replace", "replace_object", T.replace_texts(rng, T.random_pics(rng, 1), tgt_scene, new, old), scene
    )
    return Sample(
        "replace",
        "replace_object",
        old.shape,
        render(tgt_scene),
        [render(scene)],
        tgt_scene,
        mask,
        texts,
        inverse=inv,
        source_scene=scene,
    )


def _recoloured(
    rng: np.random.Generator,
    task: str,
    op: str,
    scene: Scene,
    j: int,
    colour: Colour,
    texts_for: Callable[[np.random.Generator, Scene, Obj, Obj], T.Texts],
) -> Sample:
    """Object ``j`` of ``scene`` in ``colour``: the target, mask = the object's pixels, the texts of the edit and
    of its Task Inversion twin (``texts_for(rng, scene, from_obj, to_obj)``; drawn in that order)."""
    old = scene.objects[j]
    new = dataclasses.replace(old, colour=colour)
    tgt_scene = scene.with_object(j, new)
    texts = texts_for(rng, scene, old, new)
    inv_texts = texts_for(rng, tgt_scene, new, old)
    return Sample(
        task,
        op,
        old.shape,
        render(tgt_scene),
        [render(scene)],
        tgt_scene,
        object_mask(scene, j),
        texts,
        inverse=Inverse(task, op, inv_texts, scene),
        source_scene=scene,
    )


def build_color(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    w, h, _ = _size(rng, cfg)
    scene = _scene_with_objects(rng, cfg, w, h, 1, 4, 0.2)
    j = _pick_index(rng, scene)
    colour = _new_colour(rng, scene, scene.objects[j])
    return _recoloured(
        rng,
        "color",
        "recolour_object",
        scene,
        j,
        colour,
        lambda rng, sc, a, b: T.color_texts(rng, T.random_pics(rng, 1), sc, a, b.colour),
    )


def build_background(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    w, h, _ = _size(rng, cfg)
    scene = _scene_with_objects(rng, cfg, w, h, 1, 4, 0.25)
    keep = [o.colour for o in scene.objects]
    if scene.plate is not None:
        keep.append(scene.plate.plate)
    old_desc = T.describe_background(scene.background)[0]
    for _ in range(10):
        new_bg = random_background(rng, w, h, keep, cfg.backgrounds)
        if T.describe_background(new_bg)[0] != old_desc:
            break
    tgt_scene = scene.replace(background=new_bg)
    texts = T.background_texts(rng, T.random_pics(rng, 1), new_bg)
    inv_texts = T.background_texts(rng, T.random_pics(rng, 1), scene.background)
    return Sample(
        "background",
        "background_swap",
        new_bg.kind,
        render(tgt_scene),
        [render(scene)],
        tgt_scene,
        invert_mask(foreground_mask(scene)),
        texts,
        inverse=Inverse("background", "background_swap", inv_texts, scene),
        source_scene=scene,
    )


def build_stylize(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    w, h, _ = _size(rng, cfg)
    scene = _scene_with_objects(rng, cfg, w, h, 1, 4, 0.25)
    style = STYLES[int(rng.integers(len(STYLES)))]
    src = render(scene)
    tgt = apply_style(src, style, rng)
    texts = T.stylize_texts(rng, T.random_pics(rng, 1), style)
    en, zh = T.STYLE_TEXT[style][6:8]
    return Sample(
        "stylize",
        f"filter_{style}",
        style,
        tgt,
        [src],
        scene,
        full_mask(w, h),
        texts,
        style_caption=(en, zh),
        source_scene=scene,
    )


def build_restore(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    w, h, _ = _size(rng, cfg)
    scene = _scene_with_objects(rng, cfg, w, h, 1, 4, 0.25)
    kind = DEGRADATIONS[int(rng.integers(len(DEGRADATIONS)))]
    clean = render(scene)
    texts = T.restore_texts(rng, T.random_pics(rng, 1), kind)
    return Sample(
        "restore",
        f"degrade_{kind}",
        kind,
        clean,
        [degrade(clean, kind, rng)],
        scene,
        full_mask(w, h),
        texts,
        source_scene=scene,
    )


def build_text(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    w, h, _ = _size(rng, cfg)
    words = T.sign_text(rng)
    k = int(rng.integers(len(words)))
    pool = [x for x in T.WORDS if x not in {v.upper() for v in words}]
    new_word = pool[int(rng.integers(len(pool)))]
    if words[k].istitle():
        new_word = new_word.title()
    new_words = [*words[:k], new_word, *words[k + 1 :]]
    old_text, new_text = " ".join(words), " ".join(new_words)
    scene = random_scene(rng, w, h, cfg.spec(0, 3, [old_text, new_text]))
    assert scene.plate is not None
    tgt_scene = scene.replace(plate=dataclasses.replace(scene.plate, text=new_text))
    texts = T.text_texts(rng, T.random_pics(rng, 1), words[k], new_word, old_text, new_text)
    return Sample(
        "text",
        "sign_text",
        scene.plate.font,
        render(tgt_scene),
        [render(scene)],
        tgt_scene,
        text_mask(scene, [old_text, new_text]),
        texts,
        ocr_target=new_text,
        source_scene=scene,
    )


_TRANSPOSE = {
    "flip_h": Image.Transpose.FLIP_LEFT_RIGHT,
    "flip_v": Image.Transpose.FLIP_TOP_BOTTOM,
    "rot_cw": Image.Transpose.ROTATE_270,  # PIL's ROTATE_* turn counter-clockwise
    "rot_ccw": Image.Transpose.ROTATE_90,
    "rot_180": Image.Transpose.ROTATE_180,
}


def map_box(box: tuple[int, int, int, int], op: str, w: int, h: int) -> tuple[int, int, int, int]:
    """A box under a flip / quarter turn of a ``w``×``h`` image (matches :data:`_TRANSPOSE`)."""
    x0, y0, x1, y1 = box
    if op == "flip_h":
        return (w - x1, y0, w - x0, y1)
    if op == "flip_v":
        return (x0, h - y1, x1, h - y0)
    if op == "rot_180":
        return (w - x1, h - y1, w - x0, h - y0)
    if op == "rot_cw":  # (x, y) -> (h - y, x)
        return (h - y1, x0, h - y0, x1)
    if op == "rot_ccw":  # (x, y) -> (y, w - x)
        return (y0, w - x1, y1, w - x0)
    raise ValueError(f"unknown view op {op!r}")


def _map_background(bg: Background, op: str) -> Background:
    """The background as a caption should describe it after ``op`` (gradient ends swap, stripes turn)."""
    d, swap = bg.direction, False
    turn = op in ("rot_cw", "rot_ccw")
    if bg.kind == "gradient" and d in ("vertical", "horizontal"):
        if d == "vertical":
            swap = op in ("flip_v", "rot_180", "rot_cw")
        else:
            swap = op in ("flip_h", "rot_180", "rot_ccw")
    if turn and d in ("vertical", "horizontal") and bg.kind in ("gradient", "stripes"):
        d = "horizontal" if d == "vertical" else "vertical"
    c1, c2 = (bg.c2, bg.c1) if swap else (bg.c1, bg.c2)
    return dataclasses.replace(bg, c1=c1, c2=c2, direction=d)


def build_viewpoint(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    w, h, _ = _size(rng, cfg)
    # no sign: mirrored text has no sensible caption
    scene = _scene_with_objects(rng, cfg, w, h, 1, 4, 0.0)
    src = render(scene)
    op = VIEW_OPS[int(rng.integers(len(VIEW_OPS)))]
    pics = T.random_pics(rng, 1)
    if op == "zoom":
        z = float(rng.uniform(1.4, 2.2))
        focus = scene.objects[_pick_index(rng, scene)] if rng.random() < 0.6 else None
        cx, cy = focus.centre if focus is not None else (w / 2, h / 2)
        cw, ch = w / z, h / z
        x0 = min(max(cx - cw / 2, 0.0), w - cw)
        y0 = min(max(cy - ch / 2, 0.0), h - ch)
        tgt = src.resize((w, h), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
        objs = []
        for o in scene.objects:
            b = [(o.box[0] - x0) * z, (o.box[1] - y0) * z, (o.box[2] - x0) * z, (o.box[3] - y0) * z]
            c = [max(0.0, b[0]), max(0.0, b[1]), min(float(w), b[2]), min(float(h), b[3])]
            if (
                c[2] > c[0]
                and c[3] > c[1]
                and (c[2] - c[0]) * (c[3] - c[1]) >= 0.4 * (b[2] - b[0]) * (b[3] - b[1])
            ):
                objs.append(dataclasses.replace(o, box=tuple(round(v) for v in c)))
        tgt_scene = scene.replace(objects=tuple(objs))
        texts = T.view_texts(rng, pics, "zoom", z, scene, focus)
        key = "zoom"
    else:
        tgt = src.transpose(_TRANSPOSE[op])
        tw, th = tgt.size
        objs = tuple(dataclasses.replace(o, box=map_box(o.box, op, w, h)) for o in scene.objects)
        tgt_scene = scene.replace(
            width=tw, height=th, objects=objs, background=_map_background(scene.background, op)
        )
        texts = T.view_texts(rng, pics, op)
        key = op
    return Sample(
        "viewpoint",
        f"view_{key}",
        key,
        tgt,
        [src],
        tgt_scene,
        full_mask(*tgt.size),
        texts,
        source_scene=scene,
    )


def build_compose(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    w, h, ratio = _size(rng, cfg)
    n_add = min(1 if rng.random() < 0.6 else 2, cfg.max_objects)
    base = None
    for attempt in range(6):
        cand = random_scene(
            rng, w, h, cfg.spec(0, 2 if attempt < 3 else 0, _sign(rng, 0.2, cfg), reserved=n_add)
        )
        taken = cand.boxes + ([cand.plate.box] if cand.plate is not None else [])
        pairs = [(o.shape, o.colour.name) for o in cand.objects]
        added = random_objects(rng, w, h, n_add, cand.background, taken, pairs, cfg.object_size)
        if len(added) == n_add:
            base = cand
            break
    if base is None:
        raise RuntimeError(f"could not place {n_add} objects for compose on a {w}x{h} canvas")
    if n_add == 2 and added[1].shape == added[0].shape:
        others = [s for s in SHAPES if s != added[0].shape]
        added = (added[0], dataclasses.replace(added[1], shape=others[int(rng.integers(len(others)))]))
    refs = []
    for obj in added:
        rw, rh = small_size(rng, cfg.min_side, cfg.max_side, ratio)
        light = contrasting(BACKGROUND_COLOURS, (obj.colour,)) or list(BACKGROUND_COLOURS)
        c1, c2 = light[int(rng.integers(len(light)))], light[int(rng.integers(len(light)))]
        kind = "solid" if rng.random() < 0.6 else "gradient"
        s = max(6, int(min(rw, rh) * rng.uniform(0.45, 0.75)))
        x0, y0 = int(rng.integers(0, rw - s + 1)), int(rng.integers(0, rh - s + 1))
        ref_scene = Scene(
            rw, rh, Background(kind, c1, c2), (Obj(obj.shape, obj.colour, (x0, y0, x0 + s, y0 + s)),)
        )
        refs.append(render(ref_scene))
    tgt_scene = base.replace(objects=base.objects + tuple(added))
    k0 = len(base.objects)
    mask = union(*(object_mask(tgt_scene, k0 + k) for k in range(n_add)))
    texts = T.compose_texts(rng, T.random_pics(rng, 1 + n_add), tgt_scene, added)
    return Sample(
        "compose",
        f"compose_{n_add + 1}ref",
        added[0].shape,
        render(tgt_scene),
        [render(base), *refs],
        tgt_scene,
        mask,
        texts,
        source_scene=base,
    )


# An object colour whose negative lies closer than this (RGB distance) to itself (grey: 128 → 127) has no
# visible inversion: it would give a ground truth equal to its source, which no judge can decide.
INVERT_MIN_DISTANCE = 110.0


def inverted(colour: Colour) -> Colour:
    """The negative ``255 − rgb`` of ``colour``, named after the nearest object colour (for captions only:
    the pixels are the exact negative, the name is the word a person would use for it, e.g. red → cyan)."""
    rgb = tuple(255 - v for v in colour.rgb)
    near = min(OBJECT_COLOURS, key=lambda c: colour_distance(c, Colour("", "", rgb)))
    return Colour(near.name, near.zh, rgb)


def build_invert(rng: np.random.Generator, cfg: SynthConfig) -> Sample:
    """``invert``: the named object's pixels become ``255 − v`` (shapes are drawn without anti-aliasing, so the
    re-rendered target equals Picture 1 with exactly the mask's pixels negated); the rest is unchanged.
    Inversion is its own inverse, so the Task Inversion twin is another ``invert``."""
    w, h, _ = _size(rng, cfg)
    for _ in range(10):
        scene = _scene_with_objects(rng, cfg, w, h, 1, 4, 0.2)
        picks = [
            k
            for k, o in enumerate(scene.objects)
            if colour_distance(o.colour, inverted(o.colour)) >= INVERT_MIN_DISTANCE
        ]
        if picks:
            break
    else:
        raise RuntimeError("could not draw a scene with an object whose colour inversion is visible")
    j = picks[int(rng.integers(len(picks)))]
    return _recoloured(
        rng,
        "invert",
        "invert_object",
        scene,
        j,
        inverted(scene.objects[j].colour),
        lambda rng, sc, a, b: T.invert_texts(rng, T.random_pics(rng, 1), sc, a),
    )


BUILDERS: dict[str, Callable[[np.random.Generator, SynthConfig], Sample]] = {
    "t2i": build_t2i,
    "add": build_add,
    "remove": build_remove,
    "replace": build_replace,
    "color": build_color,
    "background": build_background,
    "stylize": build_stylize,
    "restore": build_restore,
    "text": build_text,
    "viewpoint": build_viewpoint,
    "compose": build_compose,
    "invert": build_invert,
}
# Tasks a corpus draws only when its task weights name them (``--task-weights invert=1``): no default mix holds
# them, so the demo editor has never seen them (issue 20's adapter acceptance learns one).
OPT_IN_TASKS: tuple[str, ...] = ("invert",)
# The tasks of the default mix (DEFAULT_TASK_WEIGHTS); every builder is BUILDERS.
TASKS: tuple[str, ...] = tuple(t for t in BUILDERS if t not in OPT_IN_TASKS)
REVERSIBLE: frozenset[str] = frozenset({"add", "remove", "replace", "color", "background", "invert"})
