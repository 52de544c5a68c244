"""A line chart drawn with PIL (no plotting library needed): loss curves of a run."""
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (count - 1) for i in range(count)]


def _label(value: float, log: bool) -> str:
    value = 10 ** value if log else value
    return f"{value:.3g}"


def plot_curves(series: dict[str, tuple[list[float], list[float]]], path: str | Path,
                title: str = "", xlabel: str = "iteration", log_y: bool = True,
                size: tuple[int, int] = (900, 500)) -> Path:
    """Draw ``{name: (x, y)}`` as lines (y on a log scale by default) into a PNG at ``path``.

    Non-positive values are dropped on a log scale. Returns ``path``.
    """
    from .checkpoint import atomic_write

    def transform(y):
        return math.log10(y) if log_y else y

    clean = {}
    for name, (xs, ys) in series.items():
        points = [(x, transform(y)) for x, y in zip(xs, ys)
                  if math.isfinite(y) and (y > 0 or not log_y)]
        if points:
            clean[name] = points
    width, height = size
    left, right, top, bottom = 80, 20, 40, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((left, 12), title, fill="black", font=font)
    if not clean:
        draw.text((width // 2 - 40, height // 2), "no data", fill="black", font=font)
    else:
        all_x = [x for pts in clean.values() for x, _ in pts]
        all_y = [y for pts in clean.values() for _, y in pts]
        x0, x1 = min(all_x), max(all_x)
        y0, y1 = min(all_y), max(all_y)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

        def to_pixel(x, y):
            px = left + (x - x0) / (x1 - x0) * (width - left - right)
            py = height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)
            return px, py

        for y in _ticks(y0, y1):
            _, py = to_pixel(x0, y)
            draw.line([(left, py), (width - right, py)], fill="#e0e0e0")
            draw.text((5, py - 6), _label(y, log_y), fill="black", font=font)
        for x in _ticks(x0, x1):
            px, _ = to_pixel(x, y0)
            draw.line([(px, top), (px, height - bottom)], fill="#e0e0e0")
            draw.text((px - 15, height - bottom + 6), f"{x:.0f}", fill="black", font=font)
        draw.rectangle([left, top, width - right, height - bottom], outline="black")
        draw.text((width // 2 - 20, height - 25), xlabel + ("  (log-scale y)" if log_y else ""),
                  fill="black", font=font)
        for i, (name, points) in enumerate(clean.items()):
            color = COLORS[i % len(COLORS)]
            pixels = [to_pixel(x, y) for x, y in points]
            if len(pixels) > 1:
                draw.line(pixels, fill=color, width=2)
            else:
                px, py = pixels[0]
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=color)
            lx, ly = width - right - 150, top + 10 + 16 * i
            draw.line([(lx, ly + 6), (lx + 20, ly + 6)], fill=color, width=3)
            draw.text((lx + 26, ly), name, fill="black", font=font)
    path = Path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path
