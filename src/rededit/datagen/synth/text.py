"""Text templates of the synthetic corpus: captions (§2.5.1) and the three instruction styles (§2.5.2).

Every edit gets a *detailed* instruction (names colour, shape, position and picture), a *concise*
one (modifiers stripped, varied syntax: imperatives, fragments, arrows) and a *user-like* one (the
concise intent wrapped in help-seeking, conversational phrasing), in English and Chinese. Captions
come as a structured caption (subject / background / colours / layout / text / style fields) and a
short noisy alt-text ("original" caption of Table 1).

Pictures are named "Picture N" (sometimes "Image N" / "Fig. N"; Chinese "图N") so Stochastic
Instruction Alignment (:mod:`rededit.data.alignment`) can re-index them. Templates never put a
number right after an image word otherwise ("rotate the image by 90 degrees", not "image 90"), never
use plural lists ("Pictures 1 and 2") and never ordinals ("the second image"), which alignment
cannot rewrite mention by mention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rededit.datagen.synth.scene import (
    POSITIONS,
    SHAPE_ZH,
    Background,
    Colour,
    Obj,
    Scene,
    position_index,
)

PICTURE_WORDS: tuple[str, ...] = ("Picture", "Image", "Fig.")
_PICTURE_WORD_P = (0.7, 0.2, 0.1)

POSITIONS_EN: dict[str, str] = {
    "upper left": "in the upper left",
    "top": "at the top",
    "upper right": "in the upper right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "lower left": "in the lower left",
    "bottom": "at the bottom",
    "lower right": "in the lower right",
}
POSITIONS_ZH: dict[str, str] = {
    "upper left": "左上角",
    "top": "上方",
    "upper right": "右上角",
    "left": "左侧",
    "centre": "中间",
    "right": "右侧",
    "lower left": "左下角",
    "bottom": "下方",
    "lower right": "右下角",
}

# Sign words for text edits. No image words ("PHOTO", "PICTURE"): they would read as picture mentions.
WORDS: tuple[str, ...] = (
    "OPEN", "SALE", "FRESH", "COFFEE", "BOOKS", "MUSIC", "HELLO", "SUMMER", "GARDEN", "BAKERY",
    "PIZZA", "MARKET", "HOTEL", "EXIT", "PARK", "SHOP", "CAFE", "STORE", "CITY", "RIVER", "NIGHT",
    "DAILY", "LIVE", "WELCOME", "HOME", "TEA", "JAZZ", "SPORT", "FARM", "PETS", "TOYS", "BEACH",
    "SNOW", "MOON", "ROAD", "BREAD", "FLOWER", "GAMES", "LUNCH", "NEWS", "STUDIO", "DANCE",
    "FOREST", "OCEAN", "CANDY", "SOUP", "TRAIN", "WINTER",
)  # fmt: skip


@dataclass(frozen=True)
class Texts:
    """The instruction variants of one edit (EN and ZH)."""

    instruction: str
    concise: str
    user: str
    instruction_zh: str
    concise_zh: str
    user_zh: str


@dataclass(frozen=True)
class Pics:
    """How a row names its pictures.

    Attributes:
        word: "Picture", "Image" or "Fig.".
        count: number of references.
        mention: whether single-reference instructions name "Picture 1" (multi-reference rows always
            name every picture).
    """

    word: str
    count: int
    mention: bool

    def en(self, k: int) -> str:
        return f"{self.word} {k}"

    @staticmethod
    def zh(k: int) -> str:
        return f"图{k}"

    def of1(self) -> str:
        """ " of Picture 1" or ""."""
        return f" of {self.en(1)}" if self.mention else ""

    def in1(self) -> str:
        return f" in {self.en(1)}" if self.mention else ""

    def zh1(self) -> str:
        """ "图1中" or ""."""
        return f"{self.zh(1)}中" if self.mention else ""

    def it(self) -> str:
        """The image as an object: "Picture 1" or "the image"."""
        return self.en(1) if self.mention else "the image"

    def it_zh(self) -> str:
        return self.zh(1) if self.mention else "这张图片"


def random_pics(rng: np.random.Generator, count: int, mention_p: float = 0.4) -> Pics:
    word = PICTURE_WORDS[int(rng.choice(len(PICTURE_WORDS), p=_PICTURE_WORD_P))]
    return Pics(word, count, bool(count > 1 or rng.random() < mention_p))


def pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def sentence(s: str) -> str:
    """Capitalise the first letter (leaves "iPhone"-style words alone elsewhere)."""
    return s[:1].upper() + s[1:] if s else s


def position(obj: Obj, scene: Scene) -> str:
    return POSITIONS[position_index(*obj.centre, scene.width, scene.height)]


def obj_en(obj: Obj) -> str:
    return f"{obj.colour.name} {obj.shape}"


def obj_zh(obj: Obj) -> str:
    return f"{obj.colour.zh}{SHAPE_ZH[obj.shape]}"


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def a_obj(obj: Obj) -> str:
    return f"{article(obj.colour.name)} {obj_en(obj)}"


# --- user-like wrapping (§2.5.2 "User-Like Instruction Refinement") -------------------------------

_USER_EN = (
    "Could you help me {vp}?",
    "Can you {vp} for me?",
    "Hi! I'd love it if you could {vp}.",
    "Please {vp}, thanks!",
    "I want to {vp}. Can you do that?",
    "Can you help me fix this? I need to {vp}.",
    "Would you mind helping me {vp}?",
    "hey, could you {vp}? thank you so much",
    "I'm not good at editing... could you {vp} please?",
    "Quick favour: {vp}?",
)
_USER_ZH = (
    "你能帮我{vp}吗？",
    "请帮我{vp}，谢谢！",
    "麻烦{vp}。",
    "我想{vp}，可以吗？",
    "能不能帮忙{vp}？",
    "你好，帮我{vp}好吗？",
)


def user_like(rng: np.random.Generator, vp_en: str, vp_zh: str) -> tuple[str, str]:
    return sentence(pick(rng, _USER_EN).format(vp=vp_en)), pick(rng, _USER_ZH).format(vp=vp_zh)


def _texts(
    rng, detailed: Sequence[str], concise: Sequence[str], vp: Sequence[str], zh_d, zh_c, zh_vp, **slots
):
    """Fill one template of each style with ``slots`` (``{x}`` placeholders)."""
    d = sentence(pick(rng, detailed).format(**slots))
    c = pick(rng, concise).format(**slots)
    u, uz = user_like(rng, pick(rng, vp).format(**slots), pick(rng, zh_vp).format(**slots))
    return Texts(d, c, u, pick(rng, zh_d).format(**slots), pick(rng, zh_c).format(**slots), uz)


def _obj_slots(obj: Obj, scene: Scene, pics: Pics, prefix: str = "") -> dict[str, str]:
    pos = position(obj, scene)
    return {
        f"{prefix}obj": obj_en(obj),
        f"{prefix}shape": obj.shape,
        f"{prefix}colour": obj.colour.name,
        f"{prefix}where": POSITIONS_EN[pos] + pics.of1(),
        f"{prefix}pos": POSITIONS_EN[pos],
        f"{prefix}obj_zh": obj_zh(obj),
        f"{prefix}shape_zh": SHAPE_ZH[obj.shape],
        f"{prefix}colour_zh": obj.colour.zh,
        f"{prefix}where_zh": pics.zh1() + POSITIONS_ZH[pos],
        f"{prefix}pos_zh": POSITIONS_ZH[pos],
    }


# --- edit instructions ----------------------------------------------------------------------------


def color_texts(rng, pics: Pics, scene: Scene, obj: Obj, new: Colour) -> Texts:
    s = _obj_slots(obj, scene, pics) | {"new": new.name, "new_zh": new.zh, "it": pics.it()}
    return _texts(
        rng,
        (
            "change the colour of the {obj} {where} to {new}.",
            "recolour the {obj} {where} so that it becomes {new}, keeping everything else unchanged.",
            "make the {obj} located {where} {new} instead of {colour}.",
            "paint the {obj} {where} {new}; leave the background and the other shapes as they are.",
            "in {it}, turn the {colour} {shape} {pos} {new}.",
        ),
        ("make the {shape} {new}", "{shape} → {new}", "{new} {shape}", "recolor the {shape} {new}",
         "turn the {colour} {shape} {new}"),
        ("turn the {obj} {new}", "make the {shape} {new}", "change the {shape} to {new}"),
        ("把{where_zh}的{obj_zh}改成{new_zh}。", "将{where_zh}的{obj_zh}的颜色改为{new_zh}，其余保持不变。"),
        ("{shape_zh}改成{new_zh}", "把{shape_zh}变成{new_zh}"),
        ("把{obj_zh}改成{new_zh}", "把{shape_zh}换成{new_zh}"),
        **s,
    )  # fmt: skip


def invert_texts(rng, pics: Pics, scene: Scene, obj: Obj) -> Texts:
    """Colour inversion of ``obj`` (its pixels become their negative). Never names the resulting colour:
    the negative of a palette colour is only near a named one."""
    s = _obj_slots(obj, scene, pics) | {"it": pics.it()}
    return _texts(
        rng,
        (
            "invert the colours of the {obj} {where}.",
            "turn the {obj} {where} into its colour negative, keeping everything else unchanged.",
            "apply a colour inversion to the {obj} located {where} only.",
            "make the {obj} {where} look like a photographic negative; leave the background and the other shapes as they are.",
            "in {it}, invert the {colour} {shape} {pos}.",
        ),
        ("invert the {shape}", "{shape} → negative", "negative {colour} {shape}", "invert colours of the {shape}",
         "invert the {colour} {shape}"),
        ("invert the colours of the {obj}", "make the {shape} a negative", "invert the {shape}'s colours"),
        ("把{where_zh}的{obj_zh}颜色反转。", "将{where_zh}的{obj_zh}变成反色，其余保持不变。"),
        ("{shape_zh}反色", "反转{shape_zh}的颜色"),
        ("把{obj_zh}的颜色反转", "把{shape_zh}变成反色"),
        **s,
    )  # fmt: skip


def add_texts(rng, pics: Pics, scene: Scene, obj: Obj) -> Texts:
    """``scene`` is the target (it holds ``obj``)."""
    s = _obj_slots(obj, scene, pics) | {"a_obj": a_obj(obj), "it": pics.it()}
    return _texts(
        rng,
        (
            "add {a_obj} {where}.",
            "place {a_obj} {where}, without changing anything else.",
            "insert {a_obj} into {it}, {pos}.",
            "draw {a_obj} {where} on top of the background.",
        ),
        ("add {a_obj}", "add a {shape}", "{a_obj} {pos}", "put a {shape} {pos}", "+ {colour} {shape}"),
        ("add {a_obj} {pos}", "put a {shape} {pos}", "add {a_obj}"),
        ("在{where_zh}添加一个{obj_zh}。", "在{where_zh}画一个{obj_zh}，其他内容保持不变。"),
        ("加一个{obj_zh}", "添加{shape_zh}"),
        ("在{pos_zh}加一个{obj_zh}", "加个{shape_zh}"),
        **s,
    )  # fmt: skip


def remove_texts(rng, pics: Pics, scene: Scene, obj: Obj) -> Texts:
    """``scene`` is the source (it holds ``obj``)."""
    s = _obj_slots(obj, scene, pics) | {"it": pics.it()}
    return _texts(
        rng,
        (
            "remove the {obj} {where}.",
            "delete the {obj} {where} and fill the area with the background.",
            "erase the {colour} {shape} {pos} from {it}, keeping the rest unchanged.",
            "take the {obj} {where} out of the scene.",
        ),
        ("remove the {shape}", "delete the {colour} {shape}", "no {shape}", "get rid of the {shape}",
         "erase {shape}"),
        ("remove the {obj}", "get rid of the {shape}", "delete the {shape} {pos}"),
        ("删除{where_zh}的{obj_zh}。", "去掉{where_zh}的{obj_zh}，用背景填补该区域。"),
        ("去掉{shape_zh}", "删除{obj_zh}"),
        ("把{obj_zh}去掉", "删掉{pos_zh}的{shape_zh}"),
        **s,
    )  # fmt: skip


def replace_texts(rng, pics: Pics, scene: Scene, old: Obj, new: Obj) -> Texts:
    s = (
        _obj_slots(old, scene, pics)
        | _obj_slots(new, scene, pics, "new_")
        | {"a_new": a_obj(new), "it": pics.it()}
    )
    return _texts(
        rng,
        (
            "replace the {obj} {where} with {a_new}.",
            "swap the {obj} {where} for {a_new} of the same size.",
            "turn the {obj} {where} into {a_new}, keeping its position.",
            "in {it}, change the {colour} {shape} {pos} into {a_new}.",
        ),
        ("{shape} → {new_obj}", "replace the {shape} with a {new_shape}", "make the {shape} a {new_shape}",
         "swap {shape} for {new_obj}"),
        ("replace the {shape} with {a_new}", "change the {obj} into a {new_shape}"),
        ("把{where_zh}的{obj_zh}替换成{new_obj_zh}。", "将{where_zh}的{obj_zh}换成同样大小的{new_obj_zh}。"),
        ("{shape_zh}换成{new_obj_zh}", "把{shape_zh}改成{new_shape_zh}"),
        ("把{obj_zh}换成{new_obj_zh}", "把{shape_zh}变成{new_shape_zh}"),
        **s,
    )  # fmt: skip


def background_texts(rng, pics: Pics, new_bg: Background) -> Texts:
    en, zh = describe_background(new_bg)
    s = {"bg": en, "bg_zh": zh, "of1": pics.of1(), "it": pics.it(), "it_zh": pics.it_zh()}
    return _texts(
        rng,
        (
            "change the background{of1} to {bg}, keeping all shapes and text unchanged.",
            "replace the background of {it} with {bg}.",
            "keep every object in place but make the background {bg}.",
        ),
        ("{bg} background", "new background: {bg}", "change the background to {bg}"),
        ("change the background to {bg}", "make the background {bg}"),
        ("把{it_zh}的背景换成{bg_zh}，物体和文字保持不变。", "将{it_zh}的背景改为{bg_zh}。"),
        ("背景换成{bg_zh}", "背景改为{bg_zh}"),
        ("把背景换成{bg_zh}", "换一个{bg_zh}背景"),
        **s,
    )  # fmt: skip


# (detailed EN, concise EN, user verb phrase EN, detailed ZH, concise ZH, user ZH, caption style EN / ZH)
STYLE_TEXT: dict[str, tuple[str, str, str, str, str, str, str, str]] = {
    "grayscale": ("convert {it} to black and white.", "black and white", "make {it_l} black and white",
                  "将{it_zh}转换为黑白效果。", "黑白", "把{it_zh}变成黑白的",
                  "black and white", "黑白"),
    "sepia": ("give {it} a sepia, vintage photo tone.", "sepia tone", "give {it_l} an old sepia look",
              "给{it_zh}加上复古的棕褐色调。", "复古棕褐色", "把{it_zh}调成复古棕褐色",
              "sepia-toned vintage", "复古棕褐色调"),
    "posterize": ("posterize {it} so that it uses only a few flat colour levels.", "posterize",
                  "posterize {it_l}", "对{it_zh}进行色调分离，只保留少量色阶。", "色调分离",
                  "给{it_zh}做色调分离", "posterized", "色调分离"),
    "sketch": ("turn {it} into a pencil sketch with dark lines on a light background.", "pencil sketch",
               "turn {it_l} into a sketch", "把{it_zh}变成浅色背景上的铅笔素描。", "铅笔素描",
               "把{it_zh}变成素描", "pencil sketch", "铅笔素描"),
    "emboss": ("apply an embossed relief effect to {it}.", "emboss it", "make {it_l} look embossed",
               "给{it_zh}加上浮雕效果。", "浮雕", "给{it_zh}加个浮雕效果", "embossed relief", "浮雕"),
    "invert": ("invert the colours of {it}, like a photographic negative.", "invert colours",
               "invert the colours of {it_l}", "将{it_zh}的颜色反转，像底片一样。", "反色",
               "把{it_zh}反色", "colour-inverted negative", "反色底片"),
    "pixelate": ("pixelate {it} into large square blocks.", "pixelate", "make {it_l} pixelated",
                 "把{it_zh}像素化成大方块。", "像素化", "把{it_zh}做成像素风", "pixelated", "像素化"),
    "solarize": ("apply a solarize effect to {it}, inverting its brightest tones.", "solarize",
                 "solarize {it_l}", "给{it_zh}加上曝光过度的日晒效果。", "日晒效果",
                 "给{it_zh}加个日晒效果", "solarized", "日晒效果"),
    "warm": ("give {it} a warmer, golden colour tone.", "warmer tone", "make {it_l} look warmer",
             "给{it_zh}加上温暖的金色调。", "暖色调", "把{it_zh}调暖一点", "warm-toned", "暖色调"),
    "cool": ("give {it} a cooler, bluish colour tone.", "cooler tone", "make {it_l} look cooler",
             "给{it_zh}加上偏蓝的冷色调。", "冷色调", "把{it_zh}调冷一点", "cool-toned", "冷色调"),
    "contour": ("turn {it} into a contour line drawing.", "contour lines", "turn {it_l} into line art",
                "把{it_zh}变成轮廓线稿。", "轮廓线稿", "把{it_zh}变成线稿", "contour line drawing",
                "轮廓线稿"),
}  # fmt: skip


def _it_slots(pics: Pics) -> dict[str, str]:
    return {"it": pics.it(), "it_l": pics.en(1) if pics.mention else "this image", "it_zh": pics.it_zh()}


def stylize_texts(rng, pics: Pics, style: str) -> Texts:
    d, c, vp, dz, cz, vpz, _, _ = STYLE_TEXT[style]
    s = _it_slots(pics)
    conc = pick(rng, (c, f"{c}, please", sentence(c)))
    u, uz = user_like(rng, vp.format(**s), vpz.format(**s))
    return Texts(sentence(d.format(**s)), conc, u, dz.format(**s), cz, uz)


RESTORE_TEXT: dict[str, tuple[str, str, str, str, str, str]] = {
    "blur": ("remove the blur from {it} and make the edges sharp again.", "deblur", "sharpen up {it_l}",
             "去除{it_zh}的模糊，让边缘重新清晰。", "去模糊", "把{it_zh}变清晰"),
    "noise": ("remove the noise and grain from {it} while keeping every detail.", "denoise",
              "clean up the noise in {it_l}", "去除{it_zh}中的噪点，保留所有细节。", "去噪",
              "把{it_zh}的噪点去掉"),
    "jpeg": ("remove the JPEG compression artifacts and blockiness from {it}.", "fix compression artifacts",
             "fix the blocky compression in {it_l}", "去除{it_zh}中的JPEG压缩伪影和方块感。", "去压缩伪影",
             "修复{it_zh}的压缩痕迹"),
    "lowres": ("upscale {it} to a higher resolution with crisp, clean edges.", "upscale",
               "make {it_l} high resolution", "将{it_zh}放大到更高分辨率，边缘清晰。", "超分辨率",
               "把{it_zh}变成高清的"),
    "dark": ("brighten the underexposed {it_n} and restore its natural colours.", "brighten",
             "fix the lighting in {it_l}, it's too dark", "提亮曝光不足的{it_zh}，恢复自然色彩。", "提亮",
             "把{it_zh}调亮一点"),
}  # fmt: skip


def restore_texts(rng, pics: Pics, kind: str) -> Texts:
    d, c, vp, dz, cz, vpz = RESTORE_TEXT[kind]
    s = _it_slots(pics) | {"it_n": f"{pics.en(1)}" if pics.mention else "image"}
    conc = pick(rng, (c, f"{c}, please", sentence(c)))
    u, uz = user_like(rng, vp.format(**s), vpz.format(**s))
    return Texts(sentence(d.format(**s)), conc, u, dz.format(**s), cz, uz)


def text_texts(rng, pics: Pics, old_word: str, new_word: str, old_text: str, new_text: str) -> Texts:
    s = {
        "old": old_word,
        "new": new_word,
        "old_text": old_text,
        "new_text": new_text,
        "in1": pics.in1(),
        "zh1": pics.zh1(),
    }
    return _texts(
        rng,
        (
            'change the word "{old}" on the sign{in1} to "{new}", keeping the font and colours.',
            'replace "{old}" with "{new}" in the text on the sign{in1}.',
            'edit the sign{in1} so that it reads "{new_text}" instead of "{old_text}".',
        ),
        ('"{old}" → "{new}"', 'change "{old}" to "{new}"', 'text: {new_text}', 'make it say "{new_text}"'),
        ('change "{old}" to "{new}" on the sign', 'make the sign say "{new_text}"'),
        ("把{zh1}招牌上的“{old}”改成“{new}”，字体和颜色保持不变。", "将{zh1}招牌文字改为“{new_text}”。"),
        ("“{old}”改成“{new}”", "文字改为“{new_text}”"),
        ("把招牌上的“{old}”改成“{new}”", "把文字改成“{new_text}”"),
        **s,
    )  # fmt: skip


VIEW_TEXT: dict[str, tuple[str, str, str, str, str, str]] = {
    "flip_h": ("flip {it} horizontally, mirroring it from left to right.", "mirror it",
               "flip {it_l} horizontally", "将{it_zh}水平翻转（左右镜像）。", "水平翻转", "把{it_zh}左右翻转"),
    "flip_v": ("flip {it} vertically, turning it upside down as a mirror image.", "flip vertically",
               "flip {it_l} upside down", "将{it_zh}垂直翻转（上下镜像）。", "垂直翻转", "把{it_zh}上下翻转"),
    "rot_cw": ("rotate {it} by 90 degrees clockwise.", "rotate clockwise", "turn {it_l} a quarter turn to the right",
               "将{it_zh}顺时针旋转90度。", "顺时针转90度", "把{it_zh}顺时针转一下"),
    "rot_ccw": ("rotate {it} by 90 degrees counter-clockwise.", "rotate counter-clockwise",
                "turn {it_l} a quarter turn to the left", "将{it_zh}逆时针旋转90度。", "逆时针转90度",
                "把{it_zh}逆时针转一下"),
    "rot_180": ("rotate {it} by 180 degrees.", "rotate 180°", "turn {it_l} upside down by rotating it",
                "将{it_zh}旋转180度。", "旋转180度", "把{it_zh}转180度"),
    "zoom": ("zoom in on the centre of {it} by a factor of {z}.", "zoom in", "zoom into {it_l} a bit",
             "将{it_zh}的中心放大{z}倍。", "放大", "把{it_zh}放大一点"),
}  # fmt: skip


def view_texts(
    rng, pics: Pics, op: str, zoom: float = 1.0, scene: Scene | None = None, obj: Obj | None = None
) -> Texts:
    s = _it_slots(pics) | {"z": f"{zoom:.1f}"}
    if op == "zoom" and obj is not None and scene is not None:
        s |= _obj_slots(obj, scene, pics)
        return _texts(
            rng,
            ("zoom in on the {obj} {where} so that it fills more of the frame.",
             "zoom in about {z} times, centred on the {obj} {where}."),
            ("zoom in on the {shape}", "closer view of the {shape}", "zoom: {shape}"),
            ("zoom in on the {obj}", "get a closer look at the {shape}"),
            ("放大{where_zh}的{obj_zh}，让它占据更多画面。", "以{where_zh}的{obj_zh}为中心放大{z}倍。"),
            ("放大{shape_zh}", "特写{shape_zh}"),
            ("把{obj_zh}放大", "凑近看看{shape_zh}"),
            **s,
        )  # fmt: skip
    d, c, vp, dz, cz, vpz = VIEW_TEXT[op]
    u, uz = user_like(rng, vp.format(**s), vpz.format(**s))
    return Texts(sentence(d.format(**s)), c, u, dz.format(**s), cz, uz)


def compose_texts(rng, pics: Pics, target: Scene, added: Sequence[Obj]) -> Texts:
    """``added[k]`` comes from picture ``k + 2`` and sits in ``target`` (picture 1 is the base)."""
    slots: dict[str, str] = {"p1": pics.en(1), "z1": pics.zh(1)}
    for k, obj in enumerate(added, start=2):
        pos = position(obj, target)
        slots |= {
            f"p{k}": pics.en(k),
            f"z{k}": pics.zh(k),
            f"o{k}": obj_en(obj),
            f"s{k}": obj.shape,
            f"oz{k}": obj_zh(obj),
            f"sz{k}": SHAPE_ZH[obj.shape],
            f"pos{k}": POSITIONS_EN[pos],
            f"posz{k}": POSITIONS_ZH[pos],
        }
    if len(added) == 1:
        return _texts(
            rng,
            (
                "put the {o2} from {p2} into {p1}, placing it {pos2}.",
                "take the {s2} shown in {p2} and add it to {p1} {pos2}, keeping {p1} otherwise unchanged.",
                "insert the {o2} of {p2} into the scene of {p1}, {pos2}.",
            ),
            ("add the {s2} from {p2} to {p1}", "{p2} {s2} → {p1}", "put {p2}'s {s2} in {p1}"),
            ("put the {s2} from {p2} into {p1}", "add the {o2} from {p2} to {p1}"),
            ("把{z2}中的{oz2}放到{z1}的{posz2}。", "将{z2}里的{sz2}添加到{z1}的{posz2}，{z1}其余部分保持不变。"),
            ("把{z2}的{sz2}加到{z1}", "{z2}的{sz2}放进{z1}"),
            ("把{z2}里的{sz2}放到{z1}里", "把{z2}的{oz2}加到{z1}中"),
            **slots,
        )  # fmt: skip
    return _texts(
        rng,
        (
            "put the {o2} from {p2} {pos2} and the {o3} from {p3} {pos3} of {p1}.",
            "add the {s2} of {p2} and the {s3} of {p3} to {p1}: the {s2} goes {pos2}, the {s3} {pos3}.",
            "compose a new version of {p1} that also contains the {o2} from {p2} ({pos2}) and the {o3} from {p3} ({pos3}).",
        ),
        ("add the {s2} from {p2} and the {s3} from {p3} to {p1}", "{p1} + {p2} {s2} + {p3} {s3}",
         "put {p2}'s {s2} and {p3}'s {s3} into {p1}"),
        ("put the {s2} from {p2} and the {s3} from {p3} into {p1}",
         "add the {o2} from {p2} and the {o3} from {p3} to {p1}"),
        ("把{z2}中的{oz2}放到{z1}的{posz2}，再把{z3}中的{oz3}放到{z1}的{posz3}。",
         "将{z2}的{sz2}和{z3}的{sz3}一起加入{z1}，分别位于{posz2}和{posz3}。"),
        ("把{z2}的{sz2}和{z3}的{sz3}加到{z1}", "{z1}加上{z2}的{sz2}和{z3}的{sz3}"),
        ("把{z2}的{sz2}和{z3}的{sz3}放进{z1}里",),
        **slots,
    )  # fmt: skip


# --- captions -------------------------------------------------------------------------------------

_DIR_ZH = {"vertical": "垂直", "horizontal": "水平", "diagonal": "对角"}


def describe_background(bg: Background) -> tuple[str, str]:
    """(EN phrase, ZH phrase) of a background, usable after "Change the background to ..."."""
    a, b, az, bz, d = bg.c1.name, bg.c2.name, bg.c1.zh, bg.c2.zh, bg.direction
    if bg.kind == "solid":
        return f"plain {a}", f"纯{az}"
    if bg.kind == "gradient":
        return f"a {d} gradient from {a} to {b}", f"从{az}到{bz}的{_DIR_ZH[d]}渐变"
    if bg.kind == "radial":
        return (
            f"a radial gradient from {a} in the centre to {b} at the edges",
            f"中心{az}、边缘{bz}的径向渐变",
        )
    if bg.kind == "stripes":
        return f"{d} {a} and {b} stripes", f"{az}与{bz}相间的{_DIR_ZH[d]}条纹"
    if bg.kind == "checker":
        return f"a {a} and {b} checkerboard", f"{az}与{bz}相间的棋盘格"
    return f"a mottled {a} and {b} texture", f"{az}与{bz}交织的斑驳纹理"


def _layout(scene: Scene) -> tuple[list[str], list[str]]:
    en = [f"{obj_en(o)} {POSITIONS_EN[position(o, scene)]}" for o in scene.objects]
    zh = [f"{obj_zh(o)}位于{POSITIONS_ZH[position(o, scene)]}" for o in scene.objects]
    return en, zh


def _ratio_label(scene: Scene) -> str:
    from math import gcd

    g = gcd(scene.width, scene.height)
    return f"{scene.width // g}:{scene.height // g}"


def structured_caption(
    rng, scene: Scene, style_en: str = "flat 2D vector graphic", style_zh: str = "扁平二维矢量图形"
) -> tuple[str, str]:
    """Structured caption (§2.5.1): subject, background, colours, layout, text, style, framing."""
    subj_en = ", ".join(a_obj(o) for o in scene.objects) or "no objects, only the background"
    subj_zh = "、".join(f"一个{obj_zh(o)}" for o in scene.objects) or "没有物体，只有背景"
    bg_en, bg_zh = describe_background(scene.background)
    colours = list(dict.fromkeys([o.colour for o in scene.objects] + list(scene.background.colours)))
    lay_en, lay_zh = _layout(scene)
    parts_en = [
        f"Subject: {subj_en}.",
        f"Background: {bg_en}.",
        f"Colours: {', '.join(c.name for c in colours)}.",
    ]
    parts_zh = [f"主体：{subj_zh}。", f"背景：{bg_zh}。", f"颜色：{'、'.join(c.zh for c in colours)}。"]
    if lay_en:
        parts_en.append(f"Layout: {'; '.join(lay_en)}.")
        parts_zh.append(f"布局：{'；'.join(lay_zh)}。")
    if scene.plate is not None:
        p = scene.plate
        band = "top" if p.centre[1] < scene.height / 2 else "bottom"
        parts_en.append(f'Text: "{p.text}" in {p.ink.name} letters on a {p.plate.name} sign at the {band}.')
        parts_zh.append(
            f"文字：{'上方' if band == 'top' else '下方'}{p.plate.zh}招牌上的{p.ink.zh}文字“{p.text}”。"
        )
    parts_en.append(f"Style: {style_en}, even lighting, front view, {_ratio_label(scene)} frame.")
    parts_zh.append(f"风格：{style_zh}，光照均匀，正面视角。")
    if rng.random() < 0.3:  # field order varies a little so the model does not key on positions
        parts_en[0], parts_en[1] = parts_en[1], parts_en[0]
        parts_zh[0], parts_zh[1] = parts_zh[1], parts_zh[0]
    return " ".join(parts_en), "".join(parts_zh)


_ALT_TAGS = ("hd", "wallpaper", "vector", "clipart", "free download", "stock", "abstract", "4k", "png",
             "geometric", "#shapes", "design")  # fmt: skip


def original_caption(rng, scene: Scene) -> str:
    """Short noisy alt-text ("Original Cap." of Table 1): partial, lower-case, tag-like."""
    objs = [f"{o.colour.name} {o.shape}" for o in scene.objects]
    bg_word = scene.background.kind if scene.background.kind != "solid" else scene.background.c1.name
    tags = [_ALT_TAGS[i] for i in rng.choice(len(_ALT_TAGS), size=2, replace=False)]
    kind = int(rng.integers(5))
    if kind == 0 and objs:
        out = f"{' and '.join(objs[:2])} on {bg_word} background"
    elif kind == 1:
        out = f"geometric shapes {tags[0]} {tags[1]}"
    elif kind == 2:
        out = f"IMG_{int(rng.integers(1000, 9999))}.png"
    elif kind == 3 and objs:
        out = f"{objs[0]} {tags[0]} - {bg_word}"
    else:
        out = f"abstract {bg_word} {' '.join(o.split()[1] for o in objs[:3])} {tags[0]}".strip()
    if scene.plate is not None and rng.random() < 0.5:
        out += f" {scene.plate.text.lower()}"
    return out


def t2i_instruction(rng, scene: Scene) -> tuple[str, str]:
    """Instructive caption of a T2I row ("Instructive Cap." of Table 1)."""
    bg_en, bg_zh = describe_background(scene.background)
    lay_en, lay_zh = _layout(scene)
    objs_en = [f"{article(s)} {s}" for s in lay_en]
    if len(objs_en) > 1:
        listing = ", ".join(objs_en[:-1]) + " and " + objs_en[-1]
    else:
        listing = objs_en[0] if objs_en else "nothing but the background"
    verb = pick(rng, ("Draw", "Create an image with", "Generate a flat graphic showing", "Render"))
    en = f"{verb} {listing} on a background of {bg_en}."
    zh = f"画一幅画：{'，'.join(lay_zh) or '只有背景'}，背景为{bg_zh}。"
    if scene.plate is not None:
        p = scene.plate
        en += f' Add a {p.plate.name} sign that reads "{p.text}" in {p.ink.name} letters.'
        zh += f"再加一个{p.plate.zh}招牌，上面用{p.ink.zh}写着“{p.text}”。"
    return en, zh


def sign_text(rng, words: int | None = None) -> list[str]:
    """1-2 sign words (upper case or title case)."""
    k = words or int(rng.integers(1, 3))
    idx = rng.choice(len(WORDS), size=k, replace=False)
    out = [WORDS[int(i)] for i in idx]
    if rng.random() < 0.3:
        out = [w.title() for w in out]
    return out
