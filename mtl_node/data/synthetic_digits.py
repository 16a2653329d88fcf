"""Synthetic digits: printed digits rendered from fonts onto random textured backgrounds, 28x28 grey.

The paper's group 2 uses the Kaggle "synthetic digits" set (digits in many fonts embedded on random
backgrounds, preprocessed to 28x28 grey). It cannot be downloaded here, so we generate the same kind
of images, seeded:

- glyphs from the TrueType fonts matplotlib ships (DejaVu Sans/Serif/Mono in four styles, STIX,
  Computer Modern) and Pillow's built-in scalable font: no system fonts needed, so the images are
  the same on any machine with the same Pillow and matplotlib versions;
- random size, position, rotation, stroke weight, and grey level contrasting with the background
  (dark on light or light on dark);
- a background of one or two textures (smooth noise blobs, a gradient, stripes, blocks) plus fine
  grain, so a model must find the digit's shape rather than its intensity.

Rendered at 56x56 and reduced to 28x28 with a box filter, which anti-aliases like a camera would.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

SIZE = 28
CANVAS = 56
# Text fonts of matplotlib's bundled set (its math symbol fonts have no usable digits).
_FONT_PREFIXES = ("DejaVuSans", "DejaVuSerif", "STIXGeneral", "cmr10", "cmss10", "cmtt10", "cmb10")

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=1)
def font_files() -> tuple[Path, ...]:
    """The bundled TrueType files used for glyphs, in a stable order."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    files = tuple(
        p for p in sorted(folder.glob("*.ttf")) if p.name.startswith(_FONT_PREFIXES) and _has_digits(p)
    )
    if not files:
        log.warning("no fonts under %s: using Pillow's built-in font only", folder)
    return files


def _has_digits(path: Path) -> bool:
    """Some bundled faces (e.g. DejaVu "Display") are subsets without digits: they would draw blanks."""
    font = ImageFont.truetype(str(path), 32)
    for digit in "0123456789":
        image = Image.new("L", (48, 48), 0)
        ImageDraw.Draw(image).text((24, 24), digit, fill=255, font=font, anchor="mm")
        if not np.asarray(image).any():
            return False
    return True


@lru_cache(maxsize=512)
def _font(index: int, size: int) -> Font:
    files = font_files()
    if index < len(files):
        return ImageFont.truetype(str(files[index]), size)
    return ImageFont.load_default(size=size)


def font_count() -> int:
    return len(font_files()) + 1  # + Pillow's default


def render_digits(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One image per label: (n, 28, 28) float32 in [0, 1]. All randomness comes from ``rng``."""
    out = np.empty((len(labels), SIZE, SIZE), dtype=np.float32)
    for i, label in enumerate(labels):
        out[i] = render_digit(int(label), rng)
    return out


def render_digit(label: int, rng: np.random.Generator) -> np.ndarray:
    if not 0 <= label <= 9:
        raise ValueError(f"a digit is 0..9, got {label}")
    background = _background(rng)
    mask = _glyph(label, rng)
    level = float(background.mean())
    # Ink contrasts with the background: dark on light or light on dark, never nearly equal.
    if level > 0.5 or (0.35 < level <= 0.5 and rng.random() < 0.5):
        ink = rng.uniform(0.0, max(level - 0.45, 0.02))
    else:
        ink = rng.uniform(min(level + 0.45, 0.98), 1.0)
    canvas = background * (1.0 - mask) + ink * mask
    small = Image.fromarray(canvas.astype(np.float32), mode="F").resize((SIZE, SIZE), Image.Resampling.BOX)
    image = np.asarray(small) + rng.normal(0.0, 0.02, size=(SIZE, SIZE))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _glyph(label: int, rng: np.random.Generator) -> np.ndarray:
    """The digit's coverage in [0, 1] on the canvas: font, size, stroke, rotation and shift drawn."""
    font = _font(int(rng.integers(font_count())), int(rng.integers(30, 46)))
    image = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(image)
    stroke = int(rng.choice([0, 0, 1, 2]))
    centre = (CANVAS / 2 + rng.uniform(-4, 4), CANVAS / 2 + rng.uniform(-4, 4))
    draw.text(centre, str(label), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
    image = image.rotate(
        float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR, center=centre, fillcolor=0
    )
    return np.asarray(image, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator) -> np.ndarray:
    layers = [_texture(int(rng.integers(4)), rng) for _ in range(int(rng.integers(1, 3)))]
    texture = np.mean(layers, axis=0)
    lo, hi = float(texture.min()), float(texture.max())
    texture = (texture - lo) / (hi - lo + 1e-9)
    base = rng.uniform(0.0, 1.0)
    contrast = rng.uniform(0.1, 0.35)
    out = base + contrast * (texture - 0.5) + rng.normal(0.0, 0.03, size=texture.shape)
    return np.clip(out, 0.0, 1.0)


def _texture(kind: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS] / CANVAS
    if kind == 0:  # smooth blobs: coarse noise enlarged
        cells = int(rng.integers(3, 9))
        coarse = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
        return np.asarray(coarse.resize((CANVAS, CANVAS), Image.Resampling.BICUBIC), dtype=np.float64)
    angle = rng.uniform(0, np.pi)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    if kind == 1:  # gradient
        return along
    if kind == 2:  # stripes
        return np.sin(2 * np.pi * rng.uniform(2.0, 9.0) * along + rng.uniform(0, 2 * np.pi))
    cells = int(rng.integers(2, 7))  # blocks
    blocks = rng.random((cells, cells))
    return blocks[(yy * cells).astype(int), (xx * cells).astype(int)]
