"""dsclora.data: image files and MATLAB-compatible bicubic imresize (SPEC §6)."""
import math
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dsclora.atomic import atomic_path
from dsclora.data import io as io_module
from dsclora.data import png
from dsclora.data import (
    ImageReadError, PairingError, image_to_tensor, imresize, list_images, load_image, mod_crop, pair_lr_files,
    save_image, tensor_to_image,
)
from dsclora.data.io import save_samples

# ---------------------------------------------------------------------------- imresize


def naive_imresize(img: np.ndarray, scale: float) -> np.ndarray:
    """Per-output-pixel loops straight from the description of MATLAB's bicubic imresize."""

    def cubic(x):
        x = abs(x)
        if x <= 1:
            return 1.5 * x**3 - 2.5 * x**2 + 1
        if x <= 2:
            return -0.5 * x**3 + 2.5 * x**2 - 4 * x + 2
        return 0.0

    def resize_rows(a):  # along axis 0
        n = a.shape[0]
        out = np.zeros((math.ceil(n * scale - 1e-9),) + a.shape[1:])
        stretch = min(scale, 1.0)  # < 1 widens the kernel when shrinking
        for i in range(out.shape[0]):
            centre = (i + 1) / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinate
            total, acc = 0.0, 0.0
            for j in range(math.floor(centre - 2 / stretch) - 1, math.ceil(centre + 2 / stretch) + 2):
                w = stretch * cubic(stretch * (centre - j))
                if w == 0:
                    continue
                k = (j - 1) % (2 * n)  # half-sample symmetric mirror, 0-based
                k = k if k < n else 2 * n - 1 - k
                acc = acc + w * a[k]
                total += w
            out[i] = acc / total
        return out

    out = resize_rows(img.astype(np.float64))
    return np.swapaxes(resize_rows(np.swapaxes(out, 0, 1)), 0, 1)


@pytest.mark.parametrize("scale", [2, 3, 4, 8])
def test_imresize_reproduces_matlab_golden_files(shared, scale):
    for hr_path in list_images(shared / "data" / "Set5"):
        hr = mod_crop(load_image(hr_path).rgb.astype(np.float64), scale)
        golden = load_image(shared / "data" / "Set5_LR_bicubic" / f"X{scale}" / f"{hr_path.stem}x{scale}.png").rgb
        ours = np.round(np.clip(imresize(hr, 1 / scale), 0, 1) * 255)
        diff = np.abs(ours - np.round(golden.astype(np.float64) * 255))
        assert ours.shape == golden.shape, hr_path.name
        assert diff.max() <= 2 and diff.mean() <= 0.16, (hr_path.name, diff.max(), diff.mean())


@pytest.mark.parametrize("shape,scale", [
    ((13, 17, 3), 1 / 4), ((20, 9), 1 / 3), ((16, 16, 2), 0.5), ((11, 7, 3), 0.7),
    ((5, 6, 3), 2), ((4, 7), 3), ((6, 5, 1), 1.5), ((1, 1, 3), 4), ((9, 9, 3), 1.0),
])
def test_imresize_matches_naive_loops(shape, scale):
    img = np.random.default_rng(1).random(shape)
    np.testing.assert_allclose(imresize(img, scale), naive_imresize(img, scale), rtol=0, atol=1e-12)


def test_imresize_output_size_and_constant_images():
    assert imresize(np.zeros((255, 256)), 1 / 3).shape == (85, 86)  # ceil, robust to 255 * (1/3)
    assert imresize(np.zeros((10, 7, 3)), 2.5).shape == (25, 18, 3)
    const = np.full((12, 10, 3), 0.3)
    for scale in (1 / 4, 1 / 3, 2, 3):
        np.testing.assert_allclose(imresize(const, scale), 0.3, atol=1e-14)


def test_imresize_dtypes_and_bad_input():
    img = np.random.default_rng(2).random((8, 8, 3))
    assert imresize(img.astype(np.float32), 0.5).dtype == np.float32
    assert imresize((img * 255).astype(np.uint8), 0.5).dtype == np.float64
    with pytest.raises(ValueError, match="scale"):
        imresize(img, 0)
    with pytest.raises(ValueError, match="shape"):
        imresize(np.zeros((2, 3, 4, 5)), 0.5)
    with pytest.raises(ValueError, match="shape"):
        imresize(torch.zeros(5), 0.5)


@pytest.mark.parametrize("scale", [1 / 4, 1 / 3, 0.5, 2, 3])
def test_imresize_torch_matches_numpy(scale):
    rng = np.random.default_rng(3)
    batch = rng.random((2, 3, 13, 18))
    out = imresize(torch.from_numpy(batch), scale)  # float64, batched
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    for b in range(2):
        expected = imresize(batch[b].transpose(1, 2, 0), scale).transpose(2, 0, 1)
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=0, atol=1e-12)
    # float32, non-contiguous (channels-last view) and extra leading dims
    x32 = torch.from_numpy(batch).float().permute(0, 1, 3, 2).contiguous().transpose(2, 3)
    assert not x32.is_contiguous()
    np.testing.assert_allclose(imresize(x32, scale).double().numpy(), out.numpy(), atol=1e-5)
    nested = imresize(torch.from_numpy(batch)[None], scale)
    assert nested.shape == (1, *out.shape)
    np.testing.assert_allclose(nested[0].numpy(), out.numpy(), atol=1e-12)


def test_mod_crop():
    assert mod_crop(np.zeros((10, 7, 3)), 4).shape == (8, 4, 3)
    assert mod_crop(torch.zeros(2, 3, 10, 7), 3).shape == (2, 3, 9, 6)
    img = np.arange(30).reshape(5, 6)
    np.testing.assert_array_equal(mod_crop(img, 2), img[:4, :6])


# ---------------------------------------------------------------------------- image files


def write_png16(path, samples: np.ndarray) -> None:
    """A 16-bit PNG whose rows cycle through the five PNG filter types (independent encoder)."""
    h, w, c = samples.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = samples.astype(">u2").reshape(h, w * c).view(np.uint8).astype(np.int64)
    bpp = 2 * c
    rows = []
    for y in range(h):
        cur = raw[y]
        prev = raw[y - 1] if y else np.zeros_like(cur)
        left = np.concatenate([np.zeros(bpp, np.int64), cur[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        kind = y % 5
        if kind == 0:
            pred = np.zeros_like(cur)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prev
        elif kind == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - up_left
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - up_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, up_left))
        rows.append(bytes([kind]) + ((cur - pred) % 256).astype(np.uint8).tobytes())

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_load_16bit_png_all_filters(tmp_path, channels):
    samples = np.random.default_rng(channels).integers(0, 65536, (11, 9, channels), dtype=np.uint16)
    path = tmp_path / "deep.png"
    write_png16(path, samples)
    img = load_image(path)
    assert img.bit_depth == 16 and img.gray == (channels <= 2) and img.path == path
    assert img.rgb.dtype == np.float32 and img.rgb.shape == (11, 9, 3)
    colour = samples[..., :1] if channels <= 2 else samples[..., :3]
    np.testing.assert_array_equal(np.round(img.rgb.astype(np.float64) * 65535), np.broadcast_to(colour, (11, 9, 3)))
    if channels in (2, 4):
        np.testing.assert_array_equal(np.round(img.alpha.astype(np.float64) * 65535), samples[..., -1])
    else:
        assert img.alpha is None


def png_filter_types(data: bytes, row_bytes: int) -> set[int]:
    """The filter type bytes of a PNG file's scanlines (its IDAT chunks, decompressed); asserts
    that every chunk's CRC is right and no IDAT chunk is empty."""
    stream, at = b"", 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        assert struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0] == zlib.crc32(kind + body)
        assert kind != b"IDAT" or length > 0
        stream += body if kind == b"IDAT" else b""
        at += 12 + length
    raw = zlib.decompress(stream)
    return set(raw[::row_bytes + 1])


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_encoder_writes_the_exact_samples(tmp_path, monkeypatch, channels, dtype):
    """encode_png's files decode (Pillow, through load_image) to the samples written: every row
    Up-filtered, rows split over many bands, any zlib level, odd sizes, 1x1."""
    monkeypatch.setattr(png, "BAND_BYTES", 40)  # a few rows a band
    rng, top = np.random.default_rng(channels), np.iinfo(dtype).max
    path = tmp_path / "x.png"
    for shape in [(1, 1), (5, 3), (23, 17)]:
        noise = rng.integers(0, top + 1, (*shape, channels), dtype=np.int64)
        smooth = np.cumsum(rng.integers(-3, 4, (*shape, channels)), axis=1) + top // 2  # filters matter
        for samples in (noise.astype(dtype), np.clip(smooth, 0, top).astype(dtype)):
            for level in (0, 1, 9):
                data = png.encode_png(samples, level)
                assert png_filter_types(data, shape[1] * channels * samples.itemsize) == {png.UP}
                path.write_bytes(data)
                img = load_image(path)
                assert img.bit_depth == 8 * samples.itemsize and img.gray == (channels <= 2)
                colour = samples[..., :1] if channels <= 2 else samples[..., :3]
                np.testing.assert_array_equal(np.round(img.rgb.astype(np.float64) * top),
                                              np.broadcast_to(colour, (*shape, 3)))
                if channels in (2, 4):
                    np.testing.assert_array_equal(np.round(img.alpha.astype(np.float64) * top), samples[..., -1])
    for bad in (np.zeros((2, 2, 3), np.int32), np.zeros((0, 2, 3), np.uint8), np.zeros((2, 2, 5), np.uint8)):
        with pytest.raises(ValueError, match="uint8/uint16"):
            png.encode_png(bad)
    with pytest.raises(ValueError, match="level"):
        png.encode_png(np.zeros((2, 2, 3), np.uint8), 10)


def test_save_samples_writes_fast_png_levels_and_16_bits_with_encode_png(tmp_path, monkeypatch):
    calls, encode = [], io_module.encode_png
    monkeypatch.setattr(io_module, "encode_png", lambda samples, level: calls.append(level) or encode(samples, level))
    rng = np.random.default_rng(0)
    for dtype, level, ours in ((np.uint8, 1, True), (np.uint8, io_module.PILLOW_PNG_FROM_LEVEL, False),
                               (np.uint16, 9, True)):
        samples, path = rng.integers(0, np.iinfo(dtype).max + 1, (6, 5, 3), dtype=dtype), tmp_path / f"{level}.png"
        calls.clear()
        save_samples(path, samples, png_level=level)
        assert calls == ([level] if ours else [])
        top = np.iinfo(dtype).max
        np.testing.assert_array_equal(np.round(load_image(path).rgb.astype(np.float64) * top), samples)


@pytest.mark.parametrize("channels,alpha", [(3, False), (3, True), (1, False), (1, True)])
@pytest.mark.parametrize("bit_depth", [8, 16])
def test_save_load_roundtrip_png(tmp_path, channels, alpha, bit_depth):
    rng = np.random.default_rng(bit_depth + channels)
    rgb = rng.random((7, 10, 3))
    if channels == 1:
        rgb[...] = rgb[..., :1]
    a = rng.random((7, 10)) if alpha else None
    path = tmp_path / "x.png"
    save_image(path, rgb, alpha=a, bit_depth=bit_depth, gray=channels == 1)
    img = load_image(path)
    top = 2**bit_depth - 1
    assert (img.bit_depth, img.gray, img.alpha is None) == (bit_depth, channels == 1, not alpha)
    np.testing.assert_array_equal(np.round(img.rgb.astype(np.float64) * top), np.round(rgb * top))
    if alpha:
        np.testing.assert_array_equal(np.round(img.alpha.astype(np.float64) * top), np.round(a * top))
    assert os.listdir(tmp_path) == ["x.png"]  # no temporary file left behind


def test_save_rounds_and_clips(tmp_path):
    rgb = np.array([[[-0.5, 0.5 / 255 + 1e-9, 1.7]]])
    save_image(tmp_path / "r.png", rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "r.png")), [[[0, 1, 255]]])


def test_load_modes(tmp_path):
    rng = np.random.default_rng(5)
    rgb8 = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb8).save(tmp_path / "rgb.bmp")
    np.testing.assert_array_equal(np.round(load_image(tmp_path / "rgb.bmp").rgb * 255), rgb8)

    la = rng.integers(0, 256, (6, 5, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    img = load_image(tmp_path / "la.png")
    assert img.gray and img.bit_depth == 8
    np.testing.assert_array_equal(np.round(img.rgb * 255), np.repeat(la[..., :1], 3, 2))
    np.testing.assert_array_equal(np.round(img.alpha * 255), la[..., 1])

    pal = Image.fromarray(rgb8).quantize(4)
    pal.save(tmp_path / "pal.png")
    img = load_image(tmp_path / "pal.png")
    assert img.alpha is None and not img.gray
    np.testing.assert_array_equal(np.round(img.rgb * 255), np.asarray(pal.convert("RGB")))
    pal.save(tmp_path / "pal_t.png", transparency=0)
    img = load_image(tmp_path / "pal_t.png")
    np.testing.assert_array_equal(img.alpha == 0, np.asarray(pal) == 0)

    Image.fromarray(rgb8).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    img = load_image(tmp_path / "cmyk.jpg")
    assert img.rgb.shape == (6, 5, 3) and img.bit_depth == 8
    assert np.abs(img.rgb * 255 - rgb8).mean() < 20

    Image.fromarray(rgb8[..., 0] > 127).save(tmp_path / "bw.png")
    img = load_image(tmp_path / "bw.png")
    assert img.gray and set(np.unique(img.rgb)) <= {0.0, 1.0}


def test_jpeg_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, :16] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "o.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "o.jpg")
    assert img.rgb.shape == (32, 16, 3)
    assert img.rgb[:8].mean() > 0.9 and img.rgb[-8:].mean() < 0.1  # left half is now the top


def test_unreadable_files_name_file_and_reason(tmp_path):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 100).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tif")
    for name, reason in [("truncated.png", "cannot be read"), ("empty.png", "empty"),
                         ("text.png", "cannot be read"), ("missing.png", "no such"), ("float.tif", "mode F")]:
        with pytest.raises(ImageReadError, match=reason) as info:
            load_image(tmp_path / name)
        assert name in str(info.value)
    assert issubclass(ImageReadError, ValueError)


def test_save_errors_and_atomicity(tmp_path, monkeypatch):
    rgb = np.zeros((4, 4, 3))
    for kwargs, match in [({"bit_depth": 12}, "bit_depth"), ({"alpha": np.zeros((3, 4))}, "alpha shape")]:
        with pytest.raises(ValueError, match=match):
            save_image(tmp_path / "a.png", rgb, **kwargs)
    with pytest.raises(ValueError, match="16-bit"):
        save_image(tmp_path / "a.jpg", rgb, bit_depth=16)
    with pytest.raises(ValueError, match="alpha"):
        save_image(tmp_path / "a.jpg", rgb, alpha=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="suffix"):
        save_image(tmp_path / "a.xyz", rgb)
    with pytest.raises(ValueError, match="shape"):
        save_image(tmp_path / "a.png", np.zeros((4, 4, 2)))
    save_image(tmp_path / "keep.png", rgb + 0.5)
    before = (tmp_path / "keep.png").read_bytes()

    def failing_write(self, data):  # the encoded image reaches the disk half-way
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_image(tmp_path / "keep.png", rgb)
    assert (tmp_path / "keep.png").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.png"]


def test_atomic_path_gives_umask_permissions_or_keeps_the_replaced_files(tmp_path):
    previous = os.umask(0o027)
    try:
        save_image(tmp_path / "new.png", np.zeros((4, 4, 3)))
        assert stat.S_IMODE((tmp_path / "new.png").stat().st_mode) == 0o640
        os.chmod(tmp_path / "new.png", 0o604)
        with atomic_path(tmp_path / "new.png") as tmp:
            tmp.write_bytes(b"replaced")
        assert stat.S_IMODE((tmp_path / "new.png").stat().st_mode) == 0o604
    finally:
        os.umask(previous)


def test_list_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no image files"):
        list_images(tmp_path)
    for name in ("b.png", "a.JPG", "c.txt", "d.tif"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.JPG", "b.png", "d.tif"]


def test_tensor_layout_roundtrip():
    img = np.random.default_rng(6).random((5, 7, 3)).astype(np.float32)
    t = image_to_tensor(img)
    assert t.shape == (1, 3, 5, 7) and t.dtype == torch.float32
    assert torch.equal(t[0, 1], torch.from_numpy(img[..., 1]))
    np.testing.assert_array_equal(tensor_to_image(t), img)
    np.testing.assert_array_equal(tensor_to_image(t[0]), img)
    assert image_to_tensor(img[..., 0]).shape == (1, 1, 5, 7)
    with pytest.raises(ValueError, match="shape"):
        tensor_to_image(torch.zeros(2, 3, 4, 4))


# ---------------------------------------------------------------------------- LR pairing
@pytest.mark.parametrize("lr_name", ["0001x4.png", "0001_x4.png", "0001.png", "0001x4.jpg"])
def test_one_pairing_rule_for_training_and_evaluation(tmp_path, lr_name):
    """``dsclora.data.pair_lr_files`` is the rule of both training (find_images) and evaluation (load_pairs)."""
    from dsclora.evaluation import load_pairs
    from dsclora.train.data import find_images

    save_image(tmp_path / "hr" / "0001.png", np.zeros((16, 12, 3)))
    save_image(tmp_path / "lr" / lr_name, np.zeros((4, 3, 3)))
    assert pair_lr_files(list_images(tmp_path / "hr"), tmp_path / "lr", 4) == [tmp_path / "lr" / lr_name]
    assert find_images([str(tmp_path / "hr")], [str(tmp_path / "lr")], 4)[0].lr == tmp_path / "lr" / lr_name
    assert load_pairs(tmp_path / "hr", tmp_path / "lr", 4)[0].name == "0001.png"


@pytest.mark.parametrize("lr_names, message", [
    (["0001x4.png", "0001_x4.png"], r"0001.png pairs with several LR images \(0001x4.png, 0001_x4.png\)"),
    (["0001.png", "0001.jpg"], r"0001.png pairs with several LR images"),
    (["0001x2.png", "0002x4.png"], r"no LR image for HR image\(s\) 0001.png \(looked for STEM, STEMx4, STEM_x4"),
])
def test_ambiguous_or_missing_lr_is_a_clear_error(tmp_path, lr_names, message):
    from dsclora.evaluation import load_pairs
    from dsclora.train.data import find_images

    save_image(tmp_path / "hr" / "0001.png", np.zeros((16, 12, 3)))
    for name in lr_names:
        save_image(tmp_path / "lr" / name, np.zeros((4, 3, 3)))
    for pair in (lambda: find_images([str(tmp_path / "hr")], [str(tmp_path / "lr")], 4),
                 lambda: load_pairs(tmp_path / "hr", tmp_path / "lr", 4)):
        with pytest.raises(PairingError, match=message):
            pair()
