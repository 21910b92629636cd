"""Procedural scenes for the model-free template synthesis of report §2.3.

A :class:`Scene` is a full description of one image: canvas size, a :class:`Background` (solid,
gradient, radial, stripes, checkerboard or smooth noise in two named colours), 0..N coloured shapes
(:class:`Obj`, drawn back to front) and an optional :class:`TextPlate` (a sign with rendered text,
the "structured layout template" of §2.3). Rendering is a pure function of the description, so an
edit is "change the description, render again": the ground-truth target is exact and the changed
region is known from the geometry (:func:`object_mask`, :func:`text_mask`), never by diffing pixels.

Shapes are drawn without anti-aliasing (PIL polygons and ellipses are binary), so an object's mask
is exactly the set of pixels it paints. Text is anti-aliased; its mask is every pixel a glyph touches.

Coordinates are pixel corners as in :mod:`rededit.data.images`: a box ``(x0, y0, x1, y1)`` covers
pixels ``x0 <= x < x1``, ``y0 <= y < y1``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rededit.utils.logging import get_logger

log = get_logger(__name__)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Colour:
    """A named colour (English and Chinese names, RGB)."""

    name: str
    zh: str
    rgb: tuple[int, int, int]


# Saturated colours for shapes, muted ones for backgrounds, so objects stand out (and the names a
# caption uses for them are the names a person would use).
OBJECT_COLOURS: tuple[Colour, ...] = (
    Colour("red", "红色", (220, 40, 40)),
    Colour("green", "绿色", (40, 170, 60)),
    Colour("blue", "蓝色", (40, 80, 220)),
    Colour("yellow", "黄色", (245, 210, 30)),
    Colour("orange", "橙色", (245, 135, 25)),
    Colour("purple", "紫色", (135, 55, 180)),
    Colour("pink", "粉色", (245, 125, 185)),
    Colour("cyan", "青色", (30, 200, 215)),
    Colour("white", "白色", (248, 248, 248)),
    Colour("black", "黑色", (20, 20, 20)),
    Colour("brown", "棕色", (125, 75, 35)),
    Colour("grey", "灰色", (128, 128, 128)),
)

BACKGROUND_COLOURS: tuple[Colour, ...] = (
    Colour("light grey", "浅灰色", (212, 212, 212)),
    Colour("beige", "米色", (236, 222, 188)),
    Colour("light blue", "浅蓝色", (178, 208, 240)),
    Colour("mint green", "薄荷绿色", (188, 234, 204)),
    Colour("lavender", "淡紫色", (218, 204, 240)),
    Colour("peach", "桃色", (250, 212, 186)),
    Colour("navy", "藏青色", (28, 38, 82)),
    Colour("dark grey", "深灰色", (62, 62, 62)),
    Colour("olive", "橄榄色", (112, 112, 52)),
    Colour("sky blue", "天蓝色", (130, 188, 235)),
    Colour("sand", "沙色", (208, 186, 138)),
    Colour("teal", "蓝绿色", (28, 108, 112)),
)

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "hexagon",
    "diamond",
    "heart",
    "cross",
    "crescent",
)
SHAPE_ZH: dict[str, str] = {
    "circle": "圆形",
    "square": "正方形",
    "triangle": "三角形",
    "star": "五角星",
    "ring": "圆环",
    "hexagon": "六边形",
    "diamond": "菱形",
    "heart": "心形",
    "cross": "十字形",
    "crescent": "月牙",
}

BACKGROUND_KINDS: tuple[str, ...] = ("solid", "gradient", "radial", "stripes", "checker", "noise")
OBJECT_SIZE: tuple[float, float] = (0.2, 0.34)  # a shape's side as a fraction of the picture's short side
DIRECTIONS: tuple[str, ...] = ("vertical", "horizontal", "diagonal")

# Aspect ratios of the CT bucket table (report §3.4) as (width, height).
ASPECT_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 1),
    (4, 3),
    (3, 4),
    (16, 9),
    (9, 16),
    (2, 1),
    (1, 2),
    (3, 2),
    (2, 3),
)
SIZE_MULTIPLE = 32
_RATIO_TOLERANCE = 0.035  # |log(w/h) - log(a/b)| accepted as "this ratio" (448x256 counts as 16:9)

FONT_FILES: tuple[str, ...] = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
)


@dataclass(frozen=True)
class Background:
    """A two-colour procedural background.

    Attributes:
        kind: one of :data:`BACKGROUND_KINDS`.
        c1, c2: the colours (``c2`` unused for ``solid``). Gradients run from ``c1`` (top / left /
            top-left / centre) to ``c2``.
        direction: gradient / stripe direction, one of :data:`DIRECTIONS`.
        period: stripe / checker period in pixels.
        noise_seed: seed of the coarse noise grid (``noise`` only), so a re-render is identical.
    """

    kind: str
    c1: Colour
    c2: Colour
    direction: str = "vertical"
    period: int = 32
    noise_seed: int = 0

    @property
    def colours(self) -> tuple[Colour, ...]:
        return (self.c1,) if self.kind == "solid" else (self.c1, self.c2)


@dataclass(frozen=True)
class Obj:
    """A filled shape in a square box ``(x0, y0, x1, y1)``."""

    shape: str
    colour: Colour
    box: Box

    @property
    def size(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass(frozen=True)
class TextPlate:
    """A sign (filled rectangle) with one line of text centred on it.

    Attributes:
        text: the rendered string.
        font: a file name from :data:`FONT_FILES`.
        font_size: in pixels.
        box: the plate rectangle; the text is centred in it and always fits.
        plate: plate colour; ``ink``: text colour.
    """

    text: str
    font: str
    font_size: int
    box: Box
    plate: Colour
    ink: Colour

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image."""

    width: int
    height: int
    background: Background
    objects: tuple[Obj, ...] = ()
    plate: TextPlate | None = None
    style: str = "flat"  # caption hint ("flat" or a stylisation applied afterwards)

    def replace(self, **changes) -> Scene:
        return dataclasses.replace(self, **changes)

    def without(self, index: int) -> Scene:
        return self.replace(objects=self.objects[:index] + self.objects[index + 1 :])

    def with_object(self, index: int, obj: Obj) -> Scene:
        return self.replace(objects=(*self.objects[:index], obj, *self.objects[index + 1 :]))

    @property
    def boxes(self) -> list[Box]:
        return [o.box for o in self.objects]


# --- sizes ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def candidate_sizes(min_side: int, max_side: int) -> dict[tuple[int, int], tuple[tuple[int, int], ...]]:
    """All (width, height) with sides multiples of 32 in [min_side, max_side], per aspect ratio.

    A ratio no size reaches within tolerance (16:9 needs a 288-pixel side) gets the nearest sizes, so
    every ratio of :data:`ASPECT_RATIOS` is always drawable.

    Raises:
        ValueError: the side range holds no multiple of 32.
    """
    lo = math.ceil(min_side / SIZE_MULTIPLE) * SIZE_MULTIPLE
    sides = list(range(lo, max_side + 1, SIZE_MULTIPLE))
    if min_side < SIZE_MULTIPLE or not sides:
        raise ValueError(
            f"min_side={min_side}, max_side={max_side}: need {SIZE_MULTIPLE} <= min_side <= max_side "
            f"with a multiple of {SIZE_MULTIPLE} in between"
        )
    pairs = [(w, h) for w in sides for h in sides]
    out: dict[tuple[int, int], tuple[tuple[int, int], ...]] = {}
    for a, b in ASPECT_RATIOS:
        target = math.log(a / b)
        err = {p: abs(math.log(p[0] / p[1]) - target) for p in pairs}
        good = tuple(p for p in pairs if err[p] <= _RATIO_TOLERANCE)
        if not good:
            best = min(err.values())
            good = tuple(p for p in pairs if err[p] <= best + 1e-9)
        out[(a, b)] = good
    return out


def random_size(
    rng: np.random.Generator, min_side: int, max_side: int, exclude_ratio: tuple[int, int] | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Draw ``((width, height), (a, b))``: an aspect ratio uniformly, then one of its sizes."""
    table = candidate_sizes(min_side, max_side)
    ratios = [r for r in ASPECT_RATIOS if r != exclude_ratio]
    ratio = ratios[int(rng.integers(len(ratios)))]
    sizes = table[ratio]
    return sizes[int(rng.integers(len(sizes)))], ratio


def small_size(
    rng: np.random.Generator, min_side: int, max_side: int, exclude_ratio: tuple[int, int] | None
) -> tuple[int, int]:
    """A size from the smaller half of a random ratio's sizes (object pictures for ``compose``)."""
    table = candidate_sizes(min_side, max_side)
    ratios = [r for r in ASPECT_RATIOS if r != exclude_ratio]
    sizes = sorted(table[ratios[int(rng.integers(len(ratios)))]], key=lambda p: p[0] * p[1])
    sizes = sizes[: max(1, (len(sizes) + 1) // 2)]
    return sizes[int(rng.integers(len(sizes)))]


# --- colours and layout ---------------------------------------------------------------------------


def colour_distance(a: Colour, b: Colour) -> float:
    return float(np.linalg.norm(np.subtract(a.rgb, b.rgb, dtype=np.float64)))


def contrasting(
    palette: Sequence[Colour], against: Sequence[Colour], min_distance: float = 110.0
) -> list[Colour]:
    """Colours of ``palette`` at least ``min_distance`` (RGB) from every colour in ``against``."""
    return [c for c in palette if all(colour_distance(c, o) >= min_distance for o in against)]


def random_background(
    rng: np.random.Generator,
    width: int,
    height: int,
    avoid: Sequence[Colour] = (),
    kinds: Sequence[str] = BACKGROUND_KINDS,
) -> Background:
    """A background of one of ``kinds`` whose colours contrast with ``avoid`` (the shapes that will sit on it)."""
    pool = contrasting(BACKGROUND_COLOURS, avoid) or list(BACKGROUND_COLOURS)
    kind = kinds[int(rng.integers(len(kinds)))]
    i1 = int(rng.integers(len(pool)))
    others = [c for j, c in enumerate(pool) if j != i1] or pool
    c1, c2 = pool[i1], others[int(rng.integers(len(others)))]
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    short = min(width, height)
    period = max(8, int(short / rng.uniform(4.0, 10.0)))
    return Background(kind, c1, c2, direction, period, int(rng.integers(2**31)))


def boxes_overlap(a: Box, b: Box, margin: int = 0) -> bool:
    return not (
        a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]
    )


def place_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    taken: Sequence[Box],
    size_range: tuple[float, float] = OBJECT_SIZE,
    tries: int = 60,
) -> Box | None:
    """A square box of side ``size_range`` × short side that overlaps none of ``taken``, or None."""
    short = min(width, height)
    for _ in range(tries):
        s = max(6, int(rng.uniform(*size_range) * short))
        if s >= min(width, height):
            continue
        x0 = int(rng.integers(0, width - s + 1))
        y0 = int(rng.integers(0, height - s + 1))
        box = (x0, y0, x0 + s, y0 + s)
        margin = max(2, s // 12)
        if not any(boxes_overlap(box, t, margin) for t in taken):
            return box
    return None


def random_objects(
    rng: np.random.Generator,
    width: int,
    height: int,
    count: int,
    background: Background,
    taken: Sequence[Box] = (),
    avoid_pairs: Sequence[tuple[str, str]] = (),
    size_range: tuple[float, float] = OBJECT_SIZE,
) -> tuple[Obj, ...]:
    """Up to ``count`` non-overlapping shapes with distinct (shape, colour) pairs, contrasting with the
    background. Fewer come back when the canvas is full."""
    colours = contrasting(OBJECT_COLOURS, background.colours) or list(OBJECT_COLOURS)
    used = set(avoid_pairs)
    objs: list[Obj] = []
    boxes = list(taken)
    for _ in range(count):
        box = place_box(rng, width, height, boxes, size_range)
        if box is None:
            break
        for _ in range(20):
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = colours[int(rng.integers(len(colours)))]
            if (shape, colour.name) not in used:
                break
        used.add((shape, colour.name))
        objs.append(Obj(shape, colour, box))
        boxes.append(box)
    return tuple(objs)


POSITIONS: tuple[str, ...] = (
    "upper left",
    "top",
    "upper right",
    "left",
    "centre",
    "right",
    "lower left",
    "bottom",
    "lower right",
)


def position_index(x: float, y: float, width: int, height: int) -> int:
    """Index into :data:`POSITIONS` of the 3×3 grid cell holding (x, y)."""
    col = min(2, max(0, int(3 * x / width)))
    row = min(2, max(0, int(3 * y / height)))
    return row * 3 + col


def free_position_box(
    rng: np.random.Generator, width: int, height: int, taken: Sequence[Box], size_range=(0.2, 0.34)
) -> Box | None:
    return place_box(rng, width, height, taken, size_range)


# --- fonts and text plates ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def font_dir() -> Path | None:
    """matplotlib's bundled DejaVu folder, found without importing matplotlib (slow, writes caches)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"
    return path if (path / FONT_FILES[0]).is_file() else None


@functools.lru_cache(maxsize=512)
def load_font(name: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A TrueType font from :data:`FONT_FILES` at ``size`` pixels (PIL's default font if DejaVu is
    missing, which keeps synthesis working but changes the pixels)."""
    folder = font_dir()
    if folder is not None and (folder / name).is_file():
        return ImageFont.truetype(str(folder / name), size)
    log.warning("DejaVu fonts not found (matplotlib missing?); using PIL's default font")
    return ImageFont.load_default(size)


def text_extent(text: str, font_name: str, size: int) -> tuple[int, int]:
    """(width, height) of ``text`` drawn with anchor ``"mm"``."""
    x0, y0, x1, y1 = load_font(font_name, size).getbbox(text, anchor="mm")
    return math.ceil(x1 - x0), math.ceil(y1 - y0)


def random_plate(
    rng: np.random.Generator,
    width: int,
    height: int,
    texts: Sequence[str],
    background: Background,
) -> TextPlate:
    """A sign in the top or bottom band that fits every string in ``texts`` (the text edit renders
    the old and the new string on the same plate, so the plate itself never changes)."""
    font = FONT_FILES[int(rng.integers(len(FONT_FILES)))]
    size = max(9, int(min(height, 0.8 * width) * rng.uniform(0.1, 0.15)))
    pad = max(3, size // 3)
    for _ in range(8):
        extents = [text_extent(t, font, size) for t in texts]
        tw = max(e[0] for e in extents)
        th = max(text_extent("Ag" + t, font, size)[1] for t in texts)
        if tw + 2 * pad <= 0.92 * width or size <= 9:
            break
        size = max(9, int(size * 0.92 * width / (tw + 2 * pad)) - 1)
        pad = max(3, size // 3)
    pw, ph = min(width, tw + 2 * pad), min(height, th + 2 * pad)
    margin = max(2, height // 32)
    x0 = int(rng.integers(0, max(1, width - pw + 1)))
    y0 = margin if rng.random() < 0.5 else max(0, height - ph - margin)
    plates = contrasting(OBJECT_COLOURS, background.colours, 90.0) or list(OBJECT_COLOURS)
    plate = plates[int(rng.integers(len(plates)))]
    inks = contrasting(OBJECT_COLOURS, (plate,), 200.0) or [OBJECT_COLOURS[9]]
    ink = inks[int(rng.integers(len(inks)))]
    return TextPlate(texts[0], font, size, (x0, y0, x0 + pw, y0 + ph), plate, ink)


# --- rendering ------------------------------------------------------------------------------------


def render_background(bg: Background, width: int, height: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of ``bg``."""
    c1 = np.asarray(bg.c1.rgb, dtype=np.float32)
    c2 = np.asarray(bg.c2.rgb, dtype=np.float32)
    if bg.kind == "solid":
        return np.broadcast_to(c1.astype(np.uint8), (height, width, 3)).copy()
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    if bg.kind == "gradient":
        if bg.direction == "vertical":
            t = ys / max(1, height - 1) + 0 * xs
        elif bg.direction == "horizontal":
            t = xs / max(1, width - 1) + 0 * ys
        else:
            t = (xs / max(1, width - 1) + ys / max(1, height - 1)) / 2
    elif bg.kind == "radial":
        d = np.sqrt(((xs - width / 2) / (width / 2)) ** 2 + ((ys - height / 2) / (height / 2)) ** 2)
        t = np.clip(d / math.sqrt(2), 0, 1)
    elif bg.kind == "stripes":
        coord = {"vertical": xs + 0 * ys, "horizontal": ys + 0 * xs}.get(bg.direction, xs + ys)
        t = (np.floor(coord / bg.period) % 2).astype(np.float32)
    elif bg.kind == "checker":
        t = ((np.floor(xs / bg.period) + np.floor(ys / bg.period)) % 2).astype(np.float32)
    elif bg.kind == "noise":
        grid_rng = np.random.default_rng(bg.noise_seed)
        gh = max(2, round(5 * height / max(width, height)))
        gw = max(2, round(5 * width / max(width, height)))
        grid = Image.fromarray(grid_rng.random((gh, gw), dtype=np.float32), mode="F")
        t = np.clip(np.asarray(grid.resize((width, height), Image.Resampling.BICUBIC)), 0, 1)
    else:
        raise ValueError(f"unknown background kind {bg.kind!r}; expected one of {BACKGROUND_KINDS}")
    pix = c1 * (1 - t[..., None]) + c2 * t[..., None]
    return np.clip(np.rint(pix), 0, 255).astype(np.uint8)


def _regular_polygon(s: int, n: int, r_outer: float, r_inner: float | None = None, rot: float = -90.0):
    c = (s - 1) / 2
    pts = []
    k = n * 2 if r_inner is not None else n
    for i in range(k):
        r = r_outer if (r_inner is None or i % 2 == 0) else r_inner
        a = math.radians(rot + 360.0 * i / k)
        pts.append((c + r * math.cos(a), c + r * math.sin(a)))
    return pts


@functools.lru_cache(maxsize=2048)
def shape_mask(shape: str, size: int) -> Image.Image:
    """Binary ``L`` mask (0/255) of ``shape`` filling a ``size``×``size`` box. Cached: treat as read-only."""
    s = size
    m = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(m)
    r = (s - 1) / 2
    if shape == "circle":
        d.ellipse((0, 0, s - 1, s - 1), fill=255)
    elif shape == "square":
        d.rectangle((0, 0, s - 1, s - 1), fill=255)
    elif shape == "triangle":
        d.polygon([((s - 1) / 2, 0), (s - 1, s - 1), (0, s - 1)], fill=255)
    elif shape == "star":
        d.polygon(_regular_polygon(s, 5, r, r * 0.42), fill=255)
    elif shape == "ring":
        d.ellipse((0, 0, s - 1, s - 1), fill=255)
        k = round(s * 0.24)
        d.ellipse((k, k, s - 1 - k, s - 1 - k), fill=0)
    elif shape == "hexagon":
        d.polygon(_regular_polygon(s, 6, r, rot=0.0), fill=255)
    elif shape == "diamond":
        d.polygon([((s - 1) / 2, 0), (s - 1, (s - 1) / 2), ((s - 1) / 2, s - 1), (0, (s - 1) / 2)], fill=255)
    elif shape == "heart":
        t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        x = (x - x.min()) / (x.max() - x.min()) * (s - 1)
        y = (y - y.min()) / (y.max() - y.min()) * (s - 1)
        d.polygon(list(zip(x.tolist(), y.tolist())), fill=255)
    elif shape == "cross":
        a, b = round(s / 3), round(2 * s / 3) - 1
        d.rectangle((a, 0, b, s - 1), fill=255)
        d.rectangle((0, a, s - 1, b), fill=255)
    elif shape == "crescent":
        d.ellipse((0, 0, s - 1, s - 1), fill=255)
        k = round(s * 0.32)
        d.ellipse((k, -round(s * 0.05), s - 1 + k, s - 1 - round(s * 0.05)), fill=0)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return m


def draw_object(img: Image.Image, obj: Obj) -> None:
    img.paste(obj.colour.rgb, (obj.box[0], obj.box[1]), shape_mask(obj.shape, obj.size))


def _draw_text(img: Image.Image, plate: TextPlate, text: str, fill) -> None:
    ImageDraw.Draw(img).text(
        plate.centre, text, fill=fill, font=load_font(plate.font, plate.font_size), anchor="mm"
    )


def render(scene: Scene) -> Image.Image:
    """The RGB image of ``scene``."""
    img = Image.fromarray(render_background(scene.background, scene.width, scene.height), mode="RGB")
    for obj in scene.objects:
        draw_object(img, obj)
    if scene.plate is not None:
        p = scene.plate
        ImageDraw.Draw(img).rectangle((p.box[0], p.box[1], p.box[2] - 1, p.box[3] - 1), fill=p.plate.rgb)
        _draw_text(img, p, p.text, p.ink.rgb)
    return img


def object_mask(scene: Scene, index: int) -> Image.Image:
    """``L`` mask (0/255, canvas size) of the visible pixels of object ``index`` (minus objects drawn
    above it and the plate)."""
    mask = Image.new("L", (scene.width, scene.height), 0)
    obj = scene.objects[index]
    mask.paste(255, (obj.box[0], obj.box[1]), shape_mask(obj.shape, obj.size))
    for above in scene.objects[index + 1 :]:
        mask.paste(0, (above.box[0], above.box[1]), shape_mask(above.shape, above.size))
    if scene.plate is not None:
        ImageDraw.Draw(mask).rectangle(
            (scene.plate.box[0], scene.plate.box[1], scene.plate.box[2] - 1, scene.plate.box[3] - 1), fill=0
        )
    return mask


def foreground_mask(scene: Scene) -> Image.Image:
    """``L`` mask of every pixel covered by an object or the plate (what a background edit keeps)."""
    mask = Image.new("L", (scene.width, scene.height), 0)
    for obj in scene.objects:
        mask.paste(255, (obj.box[0], obj.box[1]), shape_mask(obj.shape, obj.size))
    if scene.plate is not None:
        p = scene.plate
        ImageDraw.Draw(mask).rectangle((p.box[0], p.box[1], p.box[2] - 1, p.box[3] - 1), fill=255)
    return mask


def text_mask(scene: Scene, texts: Sequence[str]) -> Image.Image:
    """``L`` mask (0/255) of every pixel any of ``texts`` touches on the scene's plate."""
    if scene.plate is None:
        raise ValueError("scene has no text plate")
    glyphs = Image.new("L", (scene.width, scene.height), 0)
    for t in texts:
        _draw_text(glyphs, scene.plate, t, 255)
    return glyphs.point(lambda v: 255 if v > 0 else 0)


def full_mask(width: int, height: int) -> Image.Image:
    return Image.new("L", (width, height), 255)


def union(*masks: Image.Image) -> Image.Image:
    out = np.zeros_like(np.asarray(masks[0]))
    for m in masks:
        out = np.maximum(out, np.asarray(m))
    return Image.fromarray(out, mode="L")


def invert_mask(mask: Image.Image) -> Image.Image:
    return Image.fromarray(255 - np.asarray(mask), mode="L")


@dataclass(frozen=True)
class SceneSpec:
    """Knobs for :func:`random_scene` (so tasks can ask for a plate, a count range, ...)."""

    min_objects: int = 1
    max_objects: int = 4
    text: Sequence[str] | None = None  # strings the plate must fit (first is rendered); None: no plate
    avoid_colours: Sequence[Colour] = field(default_factory=tuple)
    backgrounds: Sequence[str] = BACKGROUND_KINDS  # background kinds to draw from
    object_size: tuple[float, float] = OBJECT_SIZE


def random_scene(rng: np.random.Generator, width: int, height: int, spec: SceneSpec = SceneSpec()) -> Scene:
    """A random scene: background, optional plate (placed first so shapes avoid it), shapes."""
    bg = random_background(rng, width, height, spec.avoid_colours, spec.backgrounds)
    plate = random_plate(rng, width, height, spec.text, bg) if spec.text else None
    count = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    taken = [plate.box] if plate is not None else []
    objs = random_objects(rng, width, height, count, bg, taken, size_range=spec.object_size)
    return Scene(width, height, bg, objs, plate)
