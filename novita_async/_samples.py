"""Demo inputs for the emulator and the CLI: public-domain portraits, drawn faces, a contact sheet.

Imports with Pillow alone.  The portraits ship inside scikit-image (``astronaut``: Eileen
Collins, NASA) and matplotlib (``grace_hopper``: US Navy), both public domain; they are
loaded lazily, so only :func:`sample_faces` and :func:`sample_pairs` need the ``[local]``
extra.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from functools import lru_cache

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

__all__ = ["cartoon_face", "contact_sheet", "sample_faces", "sample_pairs"]

Box = tuple[int, int, int, int]
Font = ImageFont.ImageFont | ImageFont.FreeTypeFont
Colour = tuple[int, int, int]

# The region of each portrait that every variant keeps (face plus some hair and chin), so
# crops never cut into the face and it stays large enough for the detectors.
_KEEP: dict[str, Box] = {"astronaut": (130, 10, 320, 240), "grace_hopper": (160, 50, 430, 410)}

_COLOUR_SHIFTS = ("none", "warm", "cool", "muted", "bright", "dark", "contrast")


@lru_cache(maxsize=1)
def _portraits() -> tuple[tuple[str, Image.Image], ...]:
    """Load the portraits once; callers get copies."""
    try:
        from matplotlib import cbook
        from skimage import data as skdata
    except ImportError as exc:
        raise RuntimeError(
            "the sample portraits ship with scikit-image and matplotlib: "
            "pip install 'novita_async[local]'"
        ) from exc
    astronaut = Image.fromarray(skdata.astronaut()).convert("RGB")  # type: ignore[no-untyped-call]
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as jpeg:
        hopper = jpeg.convert("RGB")
    return (("astronaut", astronaut), ("grace_hopper", hopper))


def sample_faces() -> list[tuple[str, Image.Image]]:
    """The bundled public-domain portraits as (name, RGB image): astronaut, grace_hopper.

    Raises RuntimeError naming the ``[local]`` extra when scikit-image or matplotlib is
    missing.
    """
    return [(name, image.copy()) for name, image in _portraits()]


def _shift_colour(image: Image.Image, shift: str) -> Image.Image:
    """One of a few global colour casts, like different cameras or lighting."""
    if shift == "warm":
        r, g, b = image.split()
        return Image.merge(
            "RGB", (r.point(lambda v: min(255, v * 1.1)), g, b.point(lambda v: v * 0.88))
        )
    if shift == "cool":
        r, g, b = image.split()
        return Image.merge(
            "RGB", (r.point(lambda v: v * 0.9), g, b.point(lambda v: min(255, v * 1.1)))
        )
    enhancers = {
        "muted": (ImageEnhance.Color, 0.55),
        "bright": (ImageEnhance.Brightness, 1.15),
        "dark": (ImageEnhance.Brightness, 0.8),
        "contrast": (ImageEnhance.Contrast, 1.25),
    }
    if shift in enhancers:
        enhancer, factor = enhancers[shift]
        return enhancer(image).enhance(factor)
    return image


def _crop_keeping(image: Image.Image, keep: Box, rng: random.Random) -> Image.Image:
    """A random crop of `image` that contains the `keep` box."""
    x0, y0, x1, y1 = keep
    w, h = image.size
    box = (
        rng.randint(0, x0),
        rng.randint(0, y0),
        rng.randint(x1, w),
        rng.randint(y1, h),
    )
    return image.crop(box)


def _variant(
    name: str, image: Image.Image, index: int, rng: random.Random
) -> tuple[str, Image.Image]:
    """A flipped / cropped / rescaled / colour-shifted copy of a portrait, with its name."""
    parts = [name, f"v{index}"]
    keep = _KEEP[name]
    if rng.random() < 0.6:
        image = _crop_keeping(image, keep, rng)
        parts.append("crop")
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
        parts.append("flip")
    long_side = rng.choice((320, 384, 512, 640, 768, 1024))
    image = ImageOps.contain(image, (long_side, long_side), Image.Resampling.LANCZOS)
    parts.append(f"{long_side}px")
    shift = rng.choice(_COLOUR_SHIFTS)
    if shift != "none":
        image = _shift_colour(image, shift)
        parts.append(shift)
    return "-".join(parts), image


def sample_pairs(n: int, seed: int = 0) -> Iterator[tuple[str, Image.Image, str, Image.Image]]:
    """n deterministic (face_name, face_img, target_name, target_img) jobs, generated lazily.

    The first two jobs swap the two portraits as they are; later ones use variations
    (horizontal flips, crops, scales, colour shifts) so a batch of any size is meaningful.
    Every variant keeps the whole face, so each still contains a detectable face.  Bad `n`
    and missing packages raise here, not at the first job.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    return _pairs(n, _portraits() if n else (), random.Random(seed))


def _pairs(
    n: int, portraits: tuple[tuple[str, Image.Image], ...], rng: random.Random
) -> Iterator[tuple[str, Image.Image, str, Image.Image]]:
    """The generator behind :func:`sample_pairs`."""
    for i in range(n):
        (face_name, face), (target_name, target) = portraits if i % 2 == 0 else portraits[::-1]
        if i >= len(portraits):
            face_name, face = _variant(face_name, face, 2 * i, rng)
            target_name, target = _variant(target_name, target, 2 * i + 1, rng)
        yield face_name, face.copy(), target_name, target.copy()


# --------------------------------------------------------------------------- drawn faces


def _jitter(rng: random.Random, value: float, spread: float) -> float:
    """`value` moved by up to ±`spread` (relative)."""
    return value * (1 + rng.uniform(-spread, spread))


def _shade(colour: Colour, factor: float) -> Colour:
    """`colour` darkened (factor < 1) or lightened (factor > 1)."""
    r, g, b = (max(0, min(255, round(c * factor))) for c in colour)
    return (r, g, b)


def _draw_eye(draw: ImageDraw.ImageDraw, cx: float, cy: float, w: float, iris: Colour) -> None:
    """An almond eye: white, iris, pupil, glint, and an upper lid line."""
    h = w * 0.5
    draw.ellipse((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), fill=(245, 245, 240))
    r = h * 0.48
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=iris)
    p = r * 0.5
    draw.ellipse((cx - p, cy - p, cx + p, cy + p), fill=(15, 10, 10))
    g = r * 0.22
    draw.ellipse((cx - p, cy - p, cx - p + 2 * g, cy - p + 2 * g), fill=(255, 255, 255))
    draw.arc((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), 190, 350, fill=(40, 25, 20),
             width=max(2, round(w * 0.06)))  # fmt: skip


def cartoon_face(
    size: tuple[int, int] = (512, 512),
    *,
    skin: Colour = (224, 172, 140),
    seed: int = 0,
    face_box: tuple[int, int, int, int] | None = None,
) -> Image.Image:
    """A simple drawn face (for tests) that the face detectors find.

    It is drawn face-like enough for a face detector: skin-toned head with ears, neck and
    hair, eyes with whites and pupils, brows, a shaded nose and lips.  `face_box`
    (x0, y0, x1, y1) places the head within that box; by default it is centred.  `seed`
    varies proportions and colours a little.
    """
    rng = random.Random(seed)
    w, h = size
    x0, y0, x1, y1 = face_box or (round(w * 0.27), round(h * 0.17), round(w * 0.73), round(h * 0.8))
    fw, fh = x1 - x0, y1 - y0
    cx = (x0 + x1) / 2
    background = rng.choice([(200, 214, 229), (214, 222, 206), (230, 224, 214), (188, 200, 210)])
    hair = rng.choice([(60, 40, 28), (30, 25, 22), (120, 80, 40), (90, 60, 35)])
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    # Back to front: shoulders, neck, hair, ears, head, then features.
    draw.ellipse((cx - fw, y1 + fh * 0.12, cx + fw, y1 + fh * 1.2), fill=(70, 90, 130))
    draw.rectangle((cx - fw * 0.2, y1 - fh * 0.15, cx + fw * 0.2, y1 + fh * 0.25),
                   fill=_shade(skin, 0.85))  # fmt: skip
    draw.ellipse((x0 - fw * 0.08, y0 - fh * 0.1, x1 + fw * 0.08, y0 + fh * 0.6), fill=hair)
    for ex in (x0 - fw * 0.06, x1 - fw * 0.06):
        draw.ellipse((ex, y0 + fh * 0.38, ex + fw * 0.12, y0 + fh * 0.58), fill=_shade(skin, 0.92))
    draw.ellipse((x0, y0 + fh * 0.08, x1, y1), fill=skin)
    draw.chord((x0, y0 - fh * 0.02, x1, y0 + fh * 0.5), 180, 360, fill=hair)  # fringe
    _draw_features(draw, (x0, y0, fw, fh), skin, rng)
    # A slight blur stands in for a lens: detectors are trained on photos, not vector art.
    return image.filter(ImageFilter.GaussianBlur(max(1.0, fw / 160)))


# Feature positions as fractions of the head's box.  Tuned so that both MediaPipe and the
# stricter Haar cascade take the drawing for a face (Haar needs eyes and mouth close enough).
_FACE = {"eye_y": 0.46, "eye_gap": 0.19, "eye_w": 0.2, "nose_y": 0.62, "mouth_y": 0.72}


def _draw_features(
    draw: ImageDraw.ImageDraw,
    frame: tuple[float, float, float, float],
    skin: Colour,
    rng: random.Random,
) -> None:
    """Eyes, brows, nose and mouth inside the head's frame (x, y, width, height)."""
    x0, y0, fw, fh = frame
    cx = x0 + fw / 2
    eye_y = y0 + fh * _jitter(rng, _FACE["eye_y"], 0.03)
    gap = fw * _jitter(rng, _FACE["eye_gap"], 0.06)
    eye_w = fw * _jitter(rng, _FACE["eye_w"], 0.08)
    iris = rng.choice([(90, 60, 35), (60, 100, 140), (70, 110, 70), (50, 35, 25)])
    brow_w = max(3, round(fw * 0.035))
    for side in (-1, 1):
        ex = cx + side * gap
        _draw_eye(draw, ex, eye_y, eye_w, iris)
        bx0, bx1 = sorted((ex - side * eye_w * 0.6, ex + side * eye_w * 0.65))
        draw.arc((bx0, eye_y - fh * 0.12, bx1, eye_y + fh * 0.02), 200, 340,
                 fill=(50, 35, 25), width=brow_w)  # fmt: skip
    nose_y = y0 + fh * _FACE["nose_y"]
    shadow = _shade(skin, 0.78)
    draw.polygon([(cx - fw * 0.015, eye_y + fh * 0.05), (cx + fw * 0.07, nose_y),
                  (cx + fw * 0.02, nose_y + fh * 0.02)], fill=_shade(skin, 0.88))  # fmt: skip
    draw.ellipse((cx - fw * 0.1, nose_y - fh * 0.03, cx + fw * 0.1, nose_y + fh * 0.035),
                 fill=_shade(skin, 0.9))  # fmt: skip
    for side in (-1, 1):
        nx = cx + side * fw * 0.045
        draw.ellipse((nx - fw * 0.022, nose_y, nx + fw * 0.022, nose_y + fh * 0.018), fill=shadow)
    mouth_y = y0 + fh * _jitter(rng, _FACE["mouth_y"], 0.02)
    mw = fw * _jitter(rng, 0.17, 0.1)
    lips = (176, 72, 72)
    draw.chord((cx - mw, mouth_y - fh * 0.035, cx + mw, mouth_y + fh * 0.01), 180, 360, fill=lips)
    draw.chord((cx - mw, mouth_y - fh * 0.04, cx + mw, mouth_y + fh * 0.06), 0, 180,
               fill=_shade(lips, 1.1))  # fmt: skip
    draw.line((cx - mw, mouth_y, cx + mw, mouth_y), fill=(90, 30, 30), width=max(2, brow_w // 2))


# --------------------------------------------------------------------------- contact sheet

_PAD = 8
_HEADERS = ("face", "target", "result")


def _font(size: int) -> Font:
    """Pillow's built-in font at `size` (scalable when FreeType is available)."""
    return ImageFont.load_default(size=size)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int) -> str:
    """`text`, shortened with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _tile(image: Image.Image | None, thumb: int, font: Font) -> Image.Image:
    """A thumb x thumb cell: the image letterboxed on white, or a grey 'failed' tile."""
    cell = Image.new("RGB", (thumb, thumb), (255, 255, 255) if image else (150, 150, 150))
    if image is None:
        draw = ImageDraw.Draw(cell)
        draw.text((thumb / 2, thumb / 2), "failed", fill=(255, 255, 255), font=font, anchor="mm")
        return cell
    small = ImageOps.contain(image.convert("RGB"), (thumb, thumb), Image.Resampling.LANCZOS)
    cell.paste(small, ((thumb - small.width) // 2, (thumb - small.height) // 2))
    return cell


def contact_sheet(
    rows: Sequence[tuple[Image.Image, Image.Image, Image.Image | None]],
    *,
    thumb: int = 192,
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """A grid with one row per job: face, target, result (a grey 'failed' tile when None).

    Column headers run along the top; each row gets a caption line when `labels` is given.
    """
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"{len(labels)} labels for {len(rows)} rows")
    font_size = max(10, thumb // 14)
    font = _font(font_size)
    header = font_size + 2 * _PAD
    caption = font_size + _PAD if labels is not None else 0
    width = len(_HEADERS) * (thumb + _PAD) + _PAD
    height = header + len(rows) * (caption + thumb + _PAD)
    sheet = Image.new("RGB", (width, height), (236, 236, 236))
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(_HEADERS):
        x = _PAD + col * (thumb + _PAD) + thumb // 2
        draw.text((x, header // 2), title, fill=(30, 30, 30), font=font, anchor="mm")
    for i, row in enumerate(rows):
        top = header + i * (caption + thumb + _PAD)
        if labels is not None:
            text = _fit_text(draw, labels[i], font, width - 2 * _PAD)
            draw.text((_PAD, top), text, fill=(60, 60, 60), font=font)
        for col, image in enumerate(row):
            sheet.paste(_tile(image, thumb, font), (_PAD + col * (thumb + _PAD), top + caption))
    return sheet
