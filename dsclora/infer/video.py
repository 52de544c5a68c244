"""Video upscaling with PyAV: decode, upscale in batches (the image pipeline's network stage and
integer conversion), encode; audio and subtitle streams remuxed unchanged; written atomically.

Each output frame keeps its input frame's timestamp (so the frame rate, frame count, duration
and variable frame rates are kept), the display rotation and the pixel aspect ratio are copied.
10-bit sources are upscaled from 16-bit RGB and written 10-bit where the encoder allows it.
PyAV is optional: ``pip install "dsclora[video]"``.
"""
from __future__ import annotations

import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from dsclora.atomic import atomic_path

from .encode import quantize
from .pipeline import upscale_batch

if TYPE_CHECKING:  # annotations only: Upscaler.upscale_video imports this module
    from .upscaler import Upscaler

logger = logging.getLogger("dsclora")

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi")
#: encoders tried in order when no --codec is given: H.264, else MPEG-4 part 2 (in every FFmpeg).
DEFAULT_CODECS = ("libx264", "mpeg4")
#: encoders that take a constant rate factor, and the one used when none is given.
CRF_CODECS = ("libx264", "libx265", "libvpx-vp9", "libaom-av1", "libsvtav1")
DEFAULT_CRF = 18
INSTALL_HINT = 'video needs PyAV: pip install "dsclora[video]"'


class VideoError(ValueError):
    """A video cannot be upscaled (missing PyAV, unreadable file, unsupported stream...)."""


def require_av():
    """The ``av`` module, or VideoError naming the extra to install."""
    try:
        import av
    except ImportError as exc:
        raise VideoError(INSTALL_HINT) from exc
    return av


def is_video(path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoOptions:
    """Output encoding: ``codec`` (None: the first of DEFAULT_CODECS this FFmpeg has), ``crf``
    (CRF_CODECS only; None: DEFAULT_CRF for them), ``pix_fmt`` (None: the source's when the
    encoder takes it, else the encoder's first 8- or 10-bit format to match)."""

    codec: str | None = None
    crf: int | None = None
    pix_fmt: str | None = None


@dataclass(frozen=True)
class _Source:
    """What the first decoded frame tells about a video stream."""

    width: int
    height: int
    pix_fmt: str
    deep: bool  # more than 8 bits per sample
    rotation: int


def default_codec() -> str:
    av = require_av()
    for name in DEFAULT_CODECS:
        if name in av.codecs_available:
            if name != DEFAULT_CODECS[0]:
                logger.warning("dsclora infer: this FFmpeg has no %s encoder; writing %s video",
                               DEFAULT_CODECS[0], name)
            return name
    raise VideoError(f"this FFmpeg has none of the encoders {', '.join(DEFAULT_CODECS)}; pass --codec")


def upscale_video(upscaler: Upscaler, src, dst, options: VideoOptions = VideoOptions(),
                  batch: int = 1, out_scale: float | None = None, progress: bool = True) -> int:
    """Upscale the first video stream of ``src`` into ``dst`` (container from its suffix);
    returns the number of frames. Raises VideoError naming the file on bad input; ``dst`` is
    replaced only when the whole video was written (an interrupt leaves no partial file)."""
    av = require_av()
    src, dst = Path(src), Path(dst)
    source = _probe(av, src)
    try:
        with av.open(str(src)) as container, atomic_path(dst, suffix=dst.suffix) as tmp:
            return _transcode(av, container, src, tmp, source, upscaler, options, batch, out_scale, progress)
    except av.FFmpegError as exc:
        raise VideoError(f"{src}: {exc}") from exc


def _probe(av, src: Path) -> _Source:
    """Read the first frame of the first video stream: size, format, rotation; clear errors."""
    if not src.is_file():
        raise VideoError(f"{src}: no such video file")
    try:
        with av.open(str(src)) as container:
            if not container.streams.video:
                raise VideoError(f"{src}: no video stream")
            stream = container.streams.video[0]
            if stream.codec_context is None:
                raise VideoError(f"{src}: the video codec is not supported by this FFmpeg")
            frame = next(container.decode(stream), None)
    except av.FFmpegError as exc:
        raise VideoError(f"{src}: cannot be read as a video (truncated, or not a video file: {exc})") from exc
    if frame is None:
        raise VideoError(f"{src}: no decodable video frame (truncated or empty stream)")
    deep = any(c.bits > 8 for c in frame.format.components)
    return _Source(frame.width, frame.height, frame.format.name, deep, int(frame.rotation or 0))


def _output_format(av, codec: str, source: _Source, requested: str | None) -> str:
    """The output pixel format: requested, else the source's, else one of the encoder's."""
    formats = [f.name for f in (av.codec.Codec(codec, "w").video_formats or [])]
    if requested:
        if formats and requested not in formats:
            raise VideoError(f"encoder {codec} cannot write pixel format {requested} "
                             f"(it takes {', '.join(formats)})")
        return requested
    if not formats or source.pix_fmt in formats:
        return source.pix_fmt
    deep = [f for f in formats if "10" in f]
    return deep[0] if source.deep and deep else formats[0]


def _add_video_stream(av, out, stream, source: _Source, width: int, height: int, options: VideoOptions):
    codec = options.codec or default_codec()
    if codec not in av.codecs_available:
        raise VideoError(f"encoder {codec!r} is not in this FFmpeg build")
    rate = stream.average_rate or stream.guessed_rate or Fraction(25)
    video = out.add_stream(codec, rate=rate)
    pix_fmt = _output_format(av, codec, source, options.pix_fmt)
    if (width % 2 or height % 2) and _subsampled(av, pix_fmt):
        raise VideoError(f"odd output size {width}x{height} cannot be stored as {pix_fmt}; "
                         "pass --pix-fmt yuv444p or another --scale")
    video.width, video.height, video.pix_fmt = width, height, pix_fmt
    video.time_base = stream.time_base
    video.codec_context.time_base = stream.time_base
    if stream.sample_aspect_ratio:
        video.codec_context.sample_aspect_ratio = stream.sample_aspect_ratio
    if codec in CRF_CODECS:
        video.options = {"crf": str(DEFAULT_CRF if options.crf is None else options.crf)}
    elif options.crf is not None:
        raise VideoError(f"encoder {codec} takes no --crf (those that do: {', '.join(CRF_CODECS)})")
    if source.rotation:
        video.set_display_rotation(source.rotation)
    return video


def _subsampled(av, pix_fmt: str) -> bool:
    """True when ``pix_fmt`` stores chroma at less than full resolution (needs even sizes)."""
    fmt = av.VideoFormat(pix_fmt, 4, 4)
    return any(c.width < 4 or c.height < 4 for c in fmt.components)


def _transcode(av, container, src, tmp, source, upscaler, options, batch, out_scale, progress) -> int:
    stream = container.streams.video[0]
    copied = [s for s in container.streams if s.type in ("audio", "subtitle")]
    size = _output_size(source, upscaler.scale, out_scale)
    with av.open(str(tmp), "w") as out:  # the container from the suffix (the target's)
        video = _add_video_stream(av, out, stream, source, *size, options)
        remux = {s.index: out.add_stream_from_template(s) for s in copied}
        bar = tqdm(total=_frame_count(container, stream), unit="frame", desc=f"dsclora infer {src.name}",
                   disable=not progress, file=sys.stderr)
        writer = _FrameWriter(av, out, video, source.deep, bar)
        frames, count = [], 0
        try:
            for packet in container.demux(stream, *copied):
                if packet.stream.index in remux:
                    if packet.dts is not None:
                        packet.stream = remux[packet.stream.index]
                        writer.mux(packet)
                    continue
                frames.extend(_decode(av, packet, src))
                if len(frames) >= batch:
                    count += writer.submit(frames, _upscale(frames, source, upscaler, out_scale))
                    frames = []
            if frames:
                count += writer.submit(frames, _upscale(frames, source, upscaler, out_scale))
            writer.finish()
        finally:
            writer.close()
            bar.close()
    return count


class _FrameWriter:
    """Encodes upscaled batches in one background thread, one batch in flight while the next
    is computed; every packet is muxed under one lock (remuxed streams come from the reader)."""

    def __init__(self, av, out, video, deep: bool, bar):
        self.av, self.out, self.video, self.deep, self.bar = av, out, video, deep, bar
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dsclora-video-encode")
        self.pending = None

    def mux(self, packets) -> None:
        with self.lock:
            self.out.mux(packets)

    def submit(self, frames, y: torch.Tensor) -> int:
        """Encode ``frames``' upscaled ``y`` (B, 3, sH, sW) with their timestamps, in the background."""
        self._wait()
        self.pending = self.pool.submit(self._encode, frames, y)
        return len(frames)

    def finish(self) -> None:
        """Wait for the last batch and flush the encoder."""
        self._wait()
        self.mux(self.video.encode(None))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()

    def _encode(self, frames, y: torch.Tensor) -> None:
        fmt = "rgb48le" if self.deep else "rgb24"
        for frame, upscaled in zip(frames, y):
            samples = quantize(upscaled, 16 if self.deep else 8)
            encoded = self.av.VideoFrame.from_ndarray(samples, format=fmt).reformat(format=self.video.pix_fmt)
            encoded.pts, encoded.time_base = frame.pts, frame.time_base
            self.mux(self.video.encode(encoded))
            self.bar.update()


def _frame_count(container, stream) -> int | None:
    """Frames in ``stream`` as the container states it, else estimated from the duration (for the ETA)."""
    if stream.frames:
        return stream.frames
    rate = stream.average_rate or stream.guessed_rate
    if container.duration and rate:
        return round(container.duration / 1_000_000 * rate)
    return None


def _decode(av, packet, src):
    try:
        return packet.decode()
    except av.FFmpegError as exc:
        raise VideoError(f"{src}: a video packet cannot be decoded, the file may be truncated ({exc})") from exc


def _output_size(source: _Source, scale: int, out_scale: float | None) -> tuple[int, int]:
    factor = out_scale or scale
    return max(1, round(source.width * factor)), max(1, round(source.height * factor))


def frames_to_tensor(frames, deep: bool) -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1] of decoded frames: RGB 8-bit (or 16-bit for deep sources),
    divided in float32 as ``load_image`` divides image samples."""
    fmt, peak = ("rgb48le", 65535) if deep else ("rgb24", 255)
    arrays = [f.to_ndarray(format=fmt) for f in frames]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x.to(torch.float32) / np.float32(peak)


def _upscale(frames, source: _Source, upscaler, out_scale) -> torch.Tensor:
    """``frames`` in one network call: (B, 3, sH, sW) clamped to [0, 1]."""
    return upscale_batch(upscaler, frames_to_tensor(frames, source.deep), out_scale)
