"""A corpus of bad and unusual inputs for the reliability tests and ``tests/reliability_report.py``.

``build_files(folder)`` writes image files (broken, odd modes, odd sizes, odd names) and returns
one ``FileCase`` each: either the pixels a correct reader returns, or a fragment of the error.
``build_inputs(folder)`` adds what ``dsclora infer`` may be given that is not an image file
(folders without images, missing paths). ``api_cases()`` are tensors and arrays for ``Upscaler``
and the fast ops. Everything is generated: no file of the corpus is stored in the repository.
"""
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from dsclora.data import save_image

#: Side of the tiles the CLI corpus run uses: some images are larger.
TILE = 16


@dataclass
class FileCase:
    """One corpus file. ``error`` is None for a valid image, else a fragment its error must hold.

    For a valid image: ``rgb`` (H, W, 3) float in [0, 1] as a correct reader returns it (after EXIF
    rotation), compared within ``atol`` (lossy formats: None, only the size is checked), ``alpha``
    (H, W) or None, ``gray`` and ``bit_depth`` of the source.
    """

    name: str
    what: str
    error: str | None = None
    rgb: np.ndarray | None = None
    alpha: np.ndarray | None = None
    gray: bool = False
    bit_depth: int = 8
    atol: float | None = 1e-6
    size: tuple[int, int] | None = None  # (H, W) when rgb is not given

    @property
    def shape(self) -> tuple[int, int]:
        return self.size if self.rgb is None else self.rgb.shape[:2]


def tiny_span(form: str = "eval", seed: int = 0):
    """A SPAN (C = 8, x2) with small random weights everywhere, in eval mode."""
    from dsclora.models import SPAN

    model = SPAN(8, None, 2, form=form)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` 8-bit RGB pixels, with one empty IDAT."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b""))
            + _chunk(b"IEND", b""))


def _u8(rng, h, w, c=3) -> np.ndarray:
    shape = (h, w) if c == 1 else (h, w, c)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _f(samples: np.ndarray, peak: int = 255) -> np.ndarray:
    return samples.astype(np.float32) / np.float32(peak)


def _rgb_of(samples: np.ndarray, peak: int = 255) -> np.ndarray:
    """(H, W) or (H, W, C>=3) integer samples -> the (H, W, 3) float a reader returns."""
    x = _f(samples, peak)
    return np.repeat(x[..., None], 3, axis=2) if x.ndim == 2 else x[..., :3]


def build_files(folder: Path, seed: int = 0) -> list[FileCase]:
    """Write the image-file corpus into ``folder`` (created) and describe each file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases: list[FileCase] = []

    def pil(name, array, **save):
        Image.fromarray(array).save(folder / name, **save)

    def ok(name, what, rgb, **fields):
        cases.append(FileCase(name, what, rgb=rgb, **fields))

    def bad(name, what, data: bytes, error: str):
        (folder / name).write_bytes(data)
        cases.append(FileCase(name, what, error=error))

    # ---- valid images in every mode -----------------------------------------------------
    rgb = _u8(rng, 9, 11)
    pil("rgb.png", rgb)
    ok("rgb.png", "8-bit RGB PNG", _f(rgb))
    rgba = _u8(rng, 8, 7, 4)
    pil("rgba.png", rgba)
    ok("rgba.png", "RGBA PNG", _f(rgba[..., :3]), alpha=_f(rgba[..., 3]))
    gray = _u8(rng, 7, 10, 1)
    pil("gray.png", gray)
    ok("gray.png", "grayscale PNG (L)", _rgb_of(gray), gray=True)
    la = _u8(rng, 6, 9, 2)
    Image.merge("LA", [Image.fromarray(la[..., 0]), Image.fromarray(la[..., 1])]).save(folder / "gray_alpha.png")
    ok("gray_alpha.png", "gray + alpha PNG (LA)", _rgb_of(la[..., 0]), alpha=_f(la[..., 1]), gray=True)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (8, 8), dtype=np.uint8)
    p_image = Image.fromarray(index, "P")
    p_image.putpalette(palette.tobytes())
    p_image.save(folder / "palette.png")
    ok("palette.png", "palette PNG (P)", _f(palette[index]))
    p_image.save(folder / "palette_transparent.png", transparency=3)
    ok("palette_transparent.png", "palette PNG with a transparent index (tRNS)", _f(palette[index]),
       alpha=np.where(index == 3, 0, 1).astype(np.float32))
    bits = rng.random((5, 13)) > 0.5
    Image.fromarray(bits).save(folder / "bilevel.png")
    ok("bilevel.png", "1-bit PNG", _rgb_of(bits.astype(np.uint8) * 255), gray=True)
    deep = rng.integers(0, 65536, (7, 6, 3), dtype=np.uint16)
    save_image(folder / "rgb16.png", _f(deep, 65535), bit_depth=16)
    ok("rgb16.png", "16-bit RGB PNG", _f(deep, 65535), bit_depth=16)
    deep_a = rng.integers(0, 65536, (5, 8, 4), dtype=np.uint16)
    save_image(folder / "rgba16.png", _f(deep_a[..., :3], 65535), alpha=_f(deep_a[..., 3], 65535), bit_depth=16)
    ok("rgba16.png", "16-bit RGBA PNG", _f(deep_a[..., :3], 65535), alpha=_f(deep_a[..., 3], 65535), bit_depth=16)
    deep_g = rng.integers(0, 65536, (6, 7), dtype=np.uint16)
    Image.fromarray(deep_g).save(folder / "gray16.png")
    ok("gray16.png", "16-bit grayscale PNG", _rgb_of(deep_g, 65535), gray=True, bit_depth=16)
    deep_la = rng.integers(0, 65536, (4, 9, 2), dtype=np.uint16)
    save_image(folder / "gray_alpha16.png", _rgb_of(deep_la[..., 0], 65535), alpha=_f(deep_la[..., 1], 65535),
               bit_depth=16, gray=True)
    ok("gray_alpha16.png", "16-bit gray + alpha PNG", _rgb_of(deep_la[..., 0], 65535),
       alpha=_f(deep_la[..., 1], 65535), gray=True, bit_depth=16)
    row16 = rng.integers(0, 65536, (1, 19), dtype=np.uint16)
    Image.fromarray(row16).save(folder / "row16_1x19.png")
    ok("row16_1x19.png", "16-bit gray 1x19", _rgb_of(row16, 65535), gray=True, bit_depth=16)
    wide = rng.integers(0, 70000, (4, 5), dtype=np.int32)
    Image.fromarray(wide, "I").save(folder / "int32.tiff")
    ok("int32.tiff", "32-bit integer TIFF (mode I, clipped to 16 bits)",
       _rgb_of(np.minimum(wide, 65535), 65535), gray=True, bit_depth=16)

    # ---- odd sizes ------------------------------------------------------------------------
    for name, (h, w) in (("pixel_1x1.png", (1, 1)), ("row_1x17.png", (1, 17)), ("column_23x1.png", (23, 1)),
                         ("larger_than_tile.png", (TILE * 2 + 5, TILE * 3 + 1))):
        samples = _u8(rng, h, w)
        pil(name, samples)
        ok(name, f"{h}x{w} RGB" + (f" (> {TILE}px tiles)" if h > TILE else ""), _f(samples))

    # ---- other formats ------------------------------------------------------------------------
    for name, what in (("bmp_image.bmp", "BMP"), ("tiff_image.tiff", "TIFF"), ("webp_image.webp", "lossless WebP")):
        samples = _u8(rng, 6, 10)
        pil(name, samples, **({"lossless": True} if name.endswith("webp") else {}))
        ok(name, what, _f(samples))
    photo = _u8(rng, 12, 16)
    pil("photo.jpg", photo, quality=95)
    ok("photo.jpg", "baseline JPEG", None, size=(12, 16), atol=None)
    pil("progressive.jpg", photo, quality=95, progressive=True)
    ok("progressive.jpg", "progressive JPEG", None, size=(12, 16), atol=None)
    pil("gray_photo.jpg", photo[..., 0], quality=95)
    ok("gray_photo.jpg", "grayscale JPEG", None, size=(12, 16), atol=None, gray=True)
    Image.new("CMYK", (10, 6), (0, 128, 255, 64)).save(folder / "cmyk.jpg", quality=100)
    ok("cmyk.jpg", "CMYK JPEG", None, size=(6, 10), atol=None)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    pil("exif_rotated.jpg", photo[:5, :14], quality=95, exif=exif)
    ok("exif_rotated.jpg", "JPEG stored 5x14 with EXIF orientation 6 (shown 14x5)", None, size=(14, 5), atol=None)

    # ---- odd names and contents under a valid name ------------------------------------------
    for name, what in (("Ünïcödé_画像.png", "non-ASCII file name"),
                       ("name with spaces.png", "spaces in the name"),
                       ("UPPER.PNG", "upper-case suffix"), ("png_inside.jpg", "PNG bytes named .jpg")):
        samples = _u8(rng, 5, 6)
        Image.fromarray(samples).save(folder / name, format="PNG")
        ok(name, what, _f(samples))
    samples = _u8(rng, 4, 5)
    Image.fromarray(samples).save(folder / "trailing_garbage.png")
    with open(folder / "trailing_garbage.png", "ab") as f:
        f.write(b"garbage after IEND" * 10)
    ok("trailing_garbage.png", "bytes after the PNG's end", _f(samples))

    # ---- broken files ---------------------------------------------------------------------------
    png, jpg = (folder / "rgb.png").read_bytes(), (folder / "photo.jpg").read_bytes()
    bad("truncated.png", "PNG cut in half", png[:len(png) // 2], "truncated")
    bad("truncated_jpeg.jpg", "JPEG cut in half", jpg[:len(jpg) // 2], "truncated")
    png16 = (folder / "rgb16.png").read_bytes()
    bad("truncated16.png", "16-bit PNG cut in half", png16[:len(png16) // 2], "cannot be read")
    flipped = bytearray(png)
    flipped[png.index(b"IDAT") + 12] ^= 0xFF
    bad("corrupt_data.png", "PNG with a flipped byte in its compressed data", bytes(flipped), "cannot be read")
    scan = jpg.index(b"\xff\xda") + 20  # inside the entropy-coded data after the SOS header
    (folder / "damaged_scan.jpg").write_bytes(jpg[:scan] + bytes(range(1, 33)) + jpg[scan + 32:])
    ok("damaged_scan.jpg", "JPEG with 32 replaced bytes of scan data: JPEG has no checksum, so "
       "it decodes with damaged pixels (as in every reader)", None, size=(12, 16), atol=None)
    dht = jpg.index(b"\xff\xc4")
    bad("corrupt_tables.jpg", "JPEG with destroyed Huffman tables", jpg[:dht + 4] + b"\xff" * 36 + jpg[dht + 40:],
        "cannot be read")
    bad("empty.png", "zero-byte .png", b"", "empty file")
    bad("empty_jpeg.jpg", "zero-byte .jpg", b"", "empty file")
    bad("text.png", "text file named .png", b"this is not an image\n" * 4, "cannot be read")
    bad("page.jpg", "HTML named .jpg", b"<!doctype html><html><body>404</body></html>", "cannot be read")
    bad("signature_only.png", "PNG signature and nothing else", png[:8], "cannot be read")
    bad("jpeg_header_only.jpg", "JPEG start and APP0 marker only", jpg[:20], "cannot be read")
    bad("random_bytes.png", "random bytes", rng.integers(0, 256, 300, dtype=np.uint8).tobytes(), "cannot be read")
    bad("zero_width.png", "PNG declaring width 0", _png_header_only(0, 10), "cannot be read")
    bad("decompression_bomb.png", "PNG declaring 20000x20000 pixels (tiny file)", _png_header_only(20000, 20000),
        "decompression bomb")
    Image.fromarray(rng.random((3, 4), dtype=np.float32)).save(folder / "float32.tiff")
    cases.append(FileCase("float32.tiff", "32-bit float TIFF (mode F)", error="mode F"))
    (folder / "dangling.png").symlink_to(folder / "no_such_target.png")
    cases.append(FileCase("dangling.png", "symbolic link to a missing file", error="no such image file"))
    stems = [Path(c.name).stem for c in cases]
    assert len(set(stems)) == len(stems), "corpus stems must differ: the CLI run writes every output as PNG"
    return cases


@dataclass
class Outcome:
    """What happened to one corpus entry: ``passed`` if it met its expectation; ``got`` says how."""

    name: str
    what: str
    expected: str
    got: str
    passed: bool


def check_file(folder: Path, case: FileCase) -> Outcome:
    """Read ``case`` with ``load_image`` and compare with its expectation."""
    from dsclora.data import ImageReadError, load_image

    path = Path(folder) / case.name
    expected = f"error: ...{case.error}..." if case.error else _describe_image(case.shape, case.gray,
                                                                              case.alpha is not None, case.bit_depth)
    try:
        image = load_image(path)
    except ImageReadError as exc:
        message = str(exc)
        reason = message.removeprefix(str(path) + ": ")
        passed = message.startswith(str(path)) and reason_matches(reason, case.error)
        return Outcome(case.name, case.what, expected, f"error: {reason}", passed)
    except Exception as exc:  # anything else is a failure of the reader's contract
        return Outcome(case.name, case.what, expected, f"UNCLEAR {type(exc).__name__}: {exc}", False)
    got = _describe_image(image.rgb.shape[:2], image.gray, image.alpha is not None, image.bit_depth)
    passed = case.error is None and got == expected
    if passed and case.atol is not None:
        error = np.abs(image.rgb - case.rgb).max()
        if case.alpha is not None:
            error = max(error, np.abs(image.alpha - case.alpha).max())
        passed = bool(error <= case.atol)
        got += f", max |error| {error:.1g}"
    return Outcome(case.name, case.what, expected, got, passed)


def reason_matches(reason: str, fragment: str | None) -> bool:
    """Whether an error's reason (its message without the file name) holds ``fragment``."""
    return fragment is not None and fragment.lower() in reason.lower()


def _describe_image(shape, gray: bool, alpha: bool, bit_depth: int) -> str:
    return f"{shape[0]}x{shape[1]} {'gray' if gray else 'RGB'}{'+alpha' if alpha else ''} {bit_depth}-bit"


@dataclass
class InputCase:
    """A command-line input that is not an image file, and the fragment of its error."""

    argument: str
    what: str
    error: str


def build_inputs(folder: Path) -> list[InputCase]:
    """Folders without images and paths naming nothing, inside ``folder``."""
    folder = Path(folder)
    (folder / "empty_folder").mkdir(parents=True)
    (folder / "only_text").mkdir()
    (folder / "only_text" / "notes.txt").write_text("no images here")
    (folder / "folder_named.png").mkdir()
    return [
        InputCase(str(folder / "empty_folder"), "empty folder", "no image files"),
        InputCase(str(folder / "only_text"), "folder holding only a text file", "no image files"),
        InputCase(str(folder / "folder_named.png"), "empty folder named like an image", "no image files"),
        InputCase(str(folder / "missing.png"), "path to nothing", "no such file or folder"),
        InputCase(str(folder / "nothing_*.png"), "pattern matching nothing", "no file matches"),
    ]


@dataclass
class ApiCase:
    """An input for ``Upscaler``: ``make()`` builds it; ``error`` a fragment of the ValueError /
    TypeError it must raise, or None: the result must equal the Upscaler's on ``equivalent()``
    (float32 contiguous), converted back like the input."""

    name: str
    make: Callable
    error: str | None = None
    equivalent: Callable | None = None


def _image(c=3, h=6, w=7) -> torch.Tensor:
    return torch.rand(c, h, w, generator=torch.Generator().manual_seed(c * 100 + h * 10 + w))


def _with(value: float) -> torch.Tensor:
    x = _image()[None]
    x[0, 1, 2, 3] = value
    return x


def api_cases() -> list[ApiCase]:
    """Tensors and arrays a caller may pass to ``Upscaler`` (see ``ApiCase``)."""
    x = _image()
    arr = x.permute(1, 2, 0).numpy()
    return [
        ApiCase("NaN in a tensor", lambda: _with(float("nan")), "non-finite"),
        ApiCase("+inf in a tensor", lambda: _with(float("inf")), "non-finite"),
        ApiCase("-inf in a float64 tensor", lambda: _with(float("-inf")).double(), "non-finite"),
        ApiCase("NaN in a float array", lambda: np.where(arr > 0.9, np.nan, arr).astype(np.float32), "non-finite"),
        ApiCase("empty tensor (H = 0)", lambda: torch.rand(1, 3, 0, 5), "non-empty"),
        ApiCase("empty batch", lambda: torch.rand(0, 3, 4, 5), "non-empty"),
        ApiCase("empty array", lambda: np.zeros((0, 4, 3), np.float32), "non-empty"),
        ApiCase("5 channels", lambda: torch.rand(1, 5, 4, 4), "C in 1..4"),
        ApiCase("0 channels", lambda: torch.rand(1, 0, 4, 4), "C in 1..4"),
        ApiCase("(H, W, 6) array", lambda: np.zeros((4, 4, 6), np.float32), "C in 1..4"),
        ApiCase("2-D tensor", lambda: torch.rand(4, 4), "(B, C, H, W)"),
        ApiCase("5-D tensor", lambda: torch.rand(1, 1, 3, 4, 4), "(B, C, H, W)"),
        ApiCase("int64 tensor", lambda: (x * 255).long(), "float tensor"),
        ApiCase("bool tensor", lambda: x > 0.5, "float tensor"),
        ApiCase("complex tensor", lambda: x.to(torch.complex64), "float tensor"),
        ApiCase("int32 array", lambda: (arr * 255).astype(np.int32), "unsupported image dtype"),
        ApiCase("bool array", lambda: arr > 0.5, "unsupported image dtype"),
        ApiCase("a list", lambda: arr.tolist(), "expected a torch.Tensor"),
        ApiCase("float64 tensor", lambda: x.double(), None, lambda: x),
        ApiCase("float16 tensor", lambda: x.half(), None, lambda: x.half().float()),
        ApiCase("non-contiguous tensor", lambda: torch.cat([x, x], 2)[:, ::2], None,
                lambda: torch.cat([x, x], 2)[:, ::2].contiguous()),
        ApiCase("channels_last batch", lambda: x[None].contiguous(memory_format=torch.channels_last), None,
                lambda: x[None]),
        ApiCase("1x1 tensor", lambda: x[:, :1, :1], None, lambda: x[:, :1, :1].contiguous()),
        ApiCase("values outside [0, 1]", lambda: x * 3 - 1, None, lambda: x * 3 - 1),
        ApiCase("uint16 array", lambda: (arr * 65535).round().astype(np.uint16), None,
                lambda: torch.from_numpy((arr * 65535).round() / 65535).permute(2, 0, 1).float()),
    ]


def check_api(upscaler, case: ApiCase) -> Outcome:
    """Call ``upscaler`` on ``case``: its error, or the result of its equivalent input (x2 model)."""
    expected = f"error: ...{case.error}..." if case.error else "the result of the float32 contiguous equivalent"
    try:
        given = case.make()
        got = upscaler(given)
    except (ValueError, TypeError) as exc:
        return Outcome(case.name, case.name, expected, f"error: {exc}", reason_matches(str(exc), case.error))
    except Exception as exc:
        return Outcome(case.name, case.name, expected, f"UNCLEAR {type(exc).__name__}: {exc}", False)
    if case.error is not None:
        return Outcome(case.name, case.name, expected, f"no error: {type(got).__name__}", False)
    reference = upscaler(case.equivalent().float().contiguous())
    if isinstance(given, np.ndarray):
        peak = {np.uint8: 255, np.uint16: 65535}.get(given.dtype.type, 1)
        reference = reference.clamp(0, 1).permute(1, 2, 0).numpy() * peak
        reference = reference.round() if peak > 1 else reference
        error, tolerance = float(np.abs(got.astype(np.float64) - reference).max()), 1.0 if peak > 1 else 1e-6
        shape_ok = got.shape == reference.shape
    else:
        error = (got.float().reshape(reference.shape) - reference).abs().max().item()
        tolerance = 2e-3 if given.dtype == torch.float16 else 1e-6
        shape_ok = got.shape[-2:] == (given.shape[-2] * 2, given.shape[-1] * 2)
    passed = shape_ok and got.dtype == given.dtype and error <= tolerance
    return Outcome(case.name, case.name, expected,
                   f"{tuple(got.shape)} {got.dtype}, max |difference| {error:.1g} (<= {tolerance:g})", passed)


@dataclass
class BatchRun:
    """A ``dsclora infer`` run: exit code, stderr, {input: reason} of its summary, output names."""

    code: int
    stderr: str
    failures: dict[str, str]
    outputs: list[str]
    leftovers: list[str]  # hidden (temporary) files in the output folder: must be none


def cli_batch(arguments: list[str], out: Path, weights: Path, *options: str) -> BatchRun:
    """Run ``dsclora infer ARGUMENTS -o OUT --weights WEIGHTS OPTIONS`` in this process."""
    import contextlib
    import io

    from dsclora.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["infer", *arguments, "-o", str(out), "--weights", str(weights), *options])
    summary = err.getvalue().split(" inputs upscaled into ")[-1]
    failures = dict(line.removeprefix("  FAILED ").split(": ", 1) for line in summary.splitlines()
                    if line.startswith("  FAILED "))
    names = sorted(p.name for p in Path(out).iterdir()) if Path(out).is_dir() else []
    return BatchRun(code, err.getvalue(), failures, [n for n in names if not n.startswith(".")],
                    [n for n in names if n.startswith(".")])


#: Output failures that hit root too (root ignores permission bits, so chmod cannot block a write
#: in these tests): the target exists as a folder (EISDIR on the rename), the name is longer than
#: the file system allows (ENAMETOOLONG), the disk fills up half-way (ENOSPC, simulated).
WRITE_FAILURES = {"blocked.png": "Is a directory", "disk_full.png": "No space left on device",
                  "x" * 250 + ".png": "File name too long"}


def _rgb_file(path: Path, seed: int = 0) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(path)


def write_failures(folder: Path, weights: Path) -> BatchRun:
    """``dsclora infer`` of four images into ``folder / "out"`` with ``--suffix _up``: three of
    them fail to be written (WRITE_FAILURES), ``fine.png`` succeeds."""
    import errno
    from unittest import mock

    folder = Path(folder)
    (folder / "in").mkdir(parents=True)
    for name in ("blocked.png", "disk_full.png", "fine.png"):
        _rgb_file(folder / "in" / name)
    long_name = next(n for n in WRITE_FAILURES if len(n) > 200)
    _rgb_file(folder / long_name)  # 254 bytes: a valid name, not with the suffix
    (folder / "out" / "blocked_up.png").mkdir(parents=True)
    real_write = Path.write_bytes  # dsclora.atomic.write_bytes writes the encoded image with it

    def write_until_disk_full(path, data):
        if "disk_full" in path.name:
            real_write(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, data)

    with mock.patch.object(Path, "write_bytes", write_until_disk_full):
        return cli_batch([str(folder / "in"), str(folder / long_name)], folder / "out", weights, "--suffix", "_up")


def unwritable_folder(folder: Path, weights: Path) -> tuple[BatchRun, Path]:
    """``dsclora infer`` into an output folder under a regular file (ENOTDIR, for root too)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _rgb_file(folder / "a.png")
    blocker = folder / "a_file"
    blocker.write_text("not a folder")
    return cli_batch([str(folder / "a.png")], blocker / "out", weights), blocker / "out"
