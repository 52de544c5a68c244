"""Built-in sample images for the demo and tests, generated procedurally (no downloads).

Each image is a deterministic function of its seed: a smooth two-colour gradient with a
low-frequency wave, patches of stripes and checkerboards, filled and outlined shapes, rows of
text-like strokes — the edges, textures and fine lines super-resolution has to recover — with
edges of varying softness and a 1/f noise texture over everything (natural images' spectrum),
drawn at twice the size and downsampled with an antialiasing filter.
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8: two colours blended along a random direction, plus a gentle wave."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / (np.ptp(t) + 1e-9)
    t = t + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * (xx * np.sin(angle) - yy * np.cos(angle)))
    a, b = np.array(_color(rng), float), np.array(_color(rng), float)
    return np.clip(a + (b - a) * t[..., None], 0, 255).astype(np.uint8)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) float mask in [0, 1]: oriented stripes or a (rotated) checkerboard."""
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(12, 40)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    if rng.random() < 0.5:
        return (np.sin(2 * np.pi * u / period) > 0).astype(float)
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(float)


def _natural_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) zero-mean 1/f noise (the power spectrum of natural images), about ±20 levels."""
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    falloff = 1 / np.maximum(np.hypot(fy, fx), 1 / max(h, w))
    fields = []
    for _ in range(2):  # luminance-like and colour-like components
        spectrum = np.fft.rfft2(rng.standard_normal((h, w))) * falloff
        field = np.fft.irfft2(spectrum, s=(h, w))
        fields.append(field / (field.std() + 1e-9))
    tint = rng.normal(0, 0.4, 3)
    return rng.uniform(6, 20) * (fields[0][..., None] + fields[1][..., None] * tint)


def _shape_box(rng, h, w, min_size, max_size):
    sh, sw = rng.integers(min_size, max_size, 2)
    top, left = rng.integers(-sh // 4, h - sh // 2), rng.integers(-sw // 4, w - sw // 2)
    return [int(left), int(top), int(left + sw), int(top + sh)]


def _strokes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int) -> None:
    """A few rows of text-like glyphs: short strokes, hooks and dots of one colour."""
    color, size = _color(rng), int(rng.integers(h // 40 + 6, h // 14 + 8))
    x0, y = int(rng.integers(0, w // 3)), int(rng.integers(0, h - size))
    width = max(2, size // 6)
    for _ in range(int(rng.integers(1, 4))):
        x = x0
        while x < w - size and rng.random() > 0.04:
            kind = rng.integers(0, 4)
            if kind == 0:    # vertical bar
                draw.line([(x, y), (x, y + size)], fill=color, width=width)
            elif kind == 1:  # arc (round letters)
                draw.arc([x, y + size // 3, x + size // 2, y + size], 0, int(rng.integers(180, 360)),
                         fill=color, width=width)
            elif kind == 2:  # diagonal
                draw.line([(x, y + size), (x + size // 2, y)], fill=color, width=width)
            else:            # dot / gap between words
                if rng.random() < 0.5:
                    draw.ellipse([x, y, x + width + 1, y + width + 1], fill=color)
                x += size // 2
            x += size // 2 + width
        y += int(size * 1.6)
        if y > h - size:
            break


def sample_image(seed: int, height: int = 128, width: int = 128) -> np.ndarray:
    """One procedurally generated RGB image, (height, width, 3) uint8, a function of ``seed``."""
    rng = np.random.default_rng([seed, 20250417])
    h, w = 2 * height, 2 * width
    canvas = _gradient(rng, h, w).astype(float)
    for _ in range(int(rng.integers(1, 4))):  # textured patches inside rectangles or ellipses
        mask_img = Image.new("L", (w, h), 0)
        box = _shape_box(rng, h, w, h // 6, h // 2)
        shape = ImageDraw.Draw(mask_img)
        (shape.ellipse if rng.random() < 0.5 else shape.rectangle)(box, fill=255)
        mask = np.asarray(mask_img, float)[..., None] / 255 * _texture(rng, h, w)[..., None]
        canvas = canvas * (1 - mask) + np.array(_color(rng), float) * mask
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):  # shapes
        box, kind = _shape_box(rng, h, w, h // 10, h // 3), rng.integers(0, 4)
        fill, outline = _color(rng), _color(rng)
        line = int(rng.integers(1, 6))
        if kind == 0:
            draw.ellipse(box, fill=fill, outline=outline, width=line)
        elif kind == 1:
            draw.rectangle(box, fill=fill, outline=outline, width=line)
        elif kind == 2:
            points = [(int(x), int(y)) for x, y in zip(rng.integers(box[0], box[2], 3), rng.integers(box[1], box[3], 3))]
            draw.polygon(points, fill=fill, outline=outline)
        else:
            draw.line([(box[0], box[1]), (box[2], box[3])], fill=outline, width=line + 2)
    _strokes(draw, rng, h, w)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))  # edge softness varies
    canvas = np.asarray(image, float) + _natural_texture(rng, h, w)
    image = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8))
    return np.asarray(image.resize((width, height), Image.LANCZOS))


def write_sample_images(folder: str | Path, count: int, seed: int = 0, height: int = 128,
                        width: int = 128) -> list[Path]:
    """Write ``count`` sample images (seeds seed, seed + 1, ...) as PNGs; returns their paths."""
    from dsclora.data import save_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"sample_{seed + i:05d}.png"
        save_image(path, sample_image(seed + i, height, width).astype(np.float32) / 255)
        paths.append(path)
    return paths
