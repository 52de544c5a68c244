"""Video upscaling (dsclora.infer.video, ``dsclora infer clip.mp4``) on tiny clips made here."""
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from dsclora.cli import main as cli_main
from dsclora.data.io import load_image, save_image
from dsclora.infer import Upscaler, merge_span
from dsclora.infer import pipeline as pipeline_module
from dsclora.infer.video import VideoError, VideoOptions, require_av, upscale_video
from dsclora.models import SPAN

av = pytest.importorskip("av")
RATE = 10


def make_clip(path, frames=5, width=10, height=6, codec="ffv1", pix_fmt="bgr0", audio="pcm_s16le",
              rotation=0, aspect=None, seed=0, pts=None):
    """A clip of random frames at RATE fps (time base 1/1000) and, unless audio is None, a mono
    8 kHz noise track as long as the video; ``pts`` (ms) for a variable frame rate."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=RATE)
        video.width, video.height, video.pix_fmt = width, height, pix_fmt
        video.time_base = video.codec_context.time_base = Fraction(1, 1000)
        if aspect:
            video.codec_context.sample_aspect_ratio = aspect
        if rotation:
            video.set_display_rotation(rotation)
        sound = out.add_stream(audio, rate=8000, layout="mono") if audio else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts[i] if pts else i * 1000 // RATE, video.time_base
            out.mux(video.encode(frame.reformat(format=pix_fmt)))
        out.mux(video.encode(None))
        if sound:
            samples = rng.integers(-3000, 3000, (1, 8000 * frames // RATE), dtype=np.int16)
            chunk = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            chunk.sample_rate, chunk.pts = 8000, 0
            out.mux(sound.encode(chunk))
            out.mux(sound.encode(None))


def frames_rgb(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def timestamps(path):
    with av.open(str(path)) as c:
        return [f.time for f in c.decode(video=0)]


def packets(path, kind):
    with av.open(str(path)) as c:
        stream = [s for s in c.streams if s.type == kind][0]
        return [(bytes(p), p.pts) for p in c.demux(stream) if p.size]


@pytest.fixture(scope="module")
def model():
    m = SPAN(8, upscale=2, form="eval")
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


@pytest.fixture
def weights(tmp_path, model):
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("batch", [1, 2])
def test_lossless_video_equals_the_image_path_and_keeps_audio_and_timing(tmp_path, weights, batch):
    clip = tmp_path / "clip.mkv"
    make_clip(clip)
    args = ["infer", "-i", str(clip), "-o", str(tmp_path / "out"), "--weights", str(weights),
            "--codec", "ffv1", "--batch", str(batch)]
    assert cli_main(args) == 0
    out = tmp_path / "out" / "clip.mkv"
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for i, frame in enumerate(frames_rgb(clip)):
        save_image(frames_dir / f"{i}.png", frame / 255)
    assert cli_main(["infer", str(frames_dir), "-o", str(tmp_path / "images"), "--weights", str(weights)]) == 0
    upscaled = frames_rgb(out)
    assert len(upscaled) == 5 and upscaled[0].shape == (12, 20, 3)
    for i, frame in enumerate(upscaled):
        expected = np.round(load_image(tmp_path / "images" / f"{i}.png").rgb * 255).astype(np.uint8)
        limit = 0 if batch == 1 else 1  # a batch sums its GEMMs in another order
        assert np.abs(frame.astype(int) - expected).max() <= limit, i
    assert timestamps(out) == timestamps(clip)
    assert packets(out, "audio") == packets(clip, "audio")


def test_h264_default_keeps_count_duration_rotation_aspect_and_aac(tmp_path, model):
    clip = tmp_path / "clip.mp4"
    make_clip(clip, frames=6, width=12, height=8, codec="libx264", pix_fmt="yuv420p", audio="aac",
              rotation=90, aspect=Fraction(4, 3))
    dst = tmp_path / "out.mp4"
    assert upscale_video(Upscaler(merge_span(model)), clip, dst, progress=False) == 6
    with av.open(str(clip)) as a, av.open(str(dst)) as b:
        sa, sb = a.streams.video[0], b.streams.video[0]
        assert sb.codec_context.name == "h264" and (sb.width, sb.height) == (24, 16)
        assert sb.sample_aspect_ratio == sa.sample_aspect_ratio == Fraction(4, 3)
        assert b.duration == a.duration
        assert next(b.decode(video=0)).rotation == next(a.decode(video=0)).rotation == 90
    assert timestamps(dst) == timestamps(clip)
    assert packets(dst, "audio") == packets(clip, "audio")


def test_variable_frame_rate_keeps_every_timestamp(tmp_path, model):
    clip = tmp_path / "vfr.mkv"
    make_clip(clip, pts=[0, 100, 350, 400, 900], audio=None)
    dst = tmp_path / "out.mkv"
    upscale_video(Upscaler(merge_span(model)), clip, dst, VideoOptions(codec="ffv1"), progress=False)
    assert timestamps(dst) == timestamps(clip) == [0, 0.1, 0.35, 0.4, 0.9]


def test_ten_bit_stays_ten_bit(tmp_path, model):
    clip = tmp_path / "deep.mkv"
    make_clip(clip, frames=2, pix_fmt="gbrp10le", audio=None)
    dst = tmp_path / "out.mkv"
    upscale_video(Upscaler(merge_span(model)), clip, dst, VideoOptions(codec="ffv1"), progress=False)
    with av.open(str(dst)) as c:
        frame = next(c.decode(video=0))
        assert frame.format.name == "gbrp10le"
        assert len(np.unique(frame.to_ndarray(format="rgb48le") % 64)) > 1  # not 8-bit samples shifted


def test_bad_videos_fail_clearly_and_leave_nothing(tmp_path, model, weights, capsys):
    up = Upscaler(merge_span(model))
    audio_only = tmp_path / "audio.mkv"
    with av.open(str(audio_only), "w") as out:
        sound = out.add_stream("pcm_s16le", rate=8000, layout="mono")
        chunk = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        chunk.sample_rate = 8000
        out.mux(sound.encode(chunk))
        out.mux(sound.encode(None))
    with pytest.raises(VideoError, match="no video stream"):
        upscale_video(up, audio_only, tmp_path / "out_1.mkv", progress=False)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoError, match="junk.mp4"):
        upscale_video(up, junk, tmp_path / "out_2.mp4", progress=False)
    clip = tmp_path / "clip.mp4"
    make_clip(clip, width=12, height=8, codec="libx264", pix_fmt="yuv420p", audio="aac")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 3])
    with pytest.raises(VideoError, match="truncated.mp4"):
        upscale_video(up, truncated, tmp_path / "out_3.mp4", progress=False)
    odd = tmp_path / "odd.mkv"
    make_clip(odd, width=7, height=5, audio=None)
    with pytest.raises(VideoError, match="odd output size 21x15"):
        upscale_video(up, odd, tmp_path / "out_4.mp4", VideoOptions(pix_fmt="yuv420p", codec="libx264"),
                      out_scale=3, progress=False)
    with pytest.raises(VideoError, match="'no-such-codec' is not in this FFmpeg build"):
        upscale_video(up, clip, tmp_path / "out_6.mp4", VideoOptions(codec="no-such-codec"), progress=False)
    with pytest.raises(VideoError, match="encoder ffv1 takes no --crf"):
        upscale_video(up, clip, tmp_path / "out_7.mkv", VideoOptions(codec="ffv1", crf=20), progress=False)
    with pytest.raises(VideoError, match="cannot write pixel format"):
        upscale_video(up, clip, tmp_path / "out_5.mp4", VideoOptions(pix_fmt="rgb48le"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("out_", "."))) == []
    code = cli_main(["infer", str(junk), str(clip), "-o", str(tmp_path / "out"), "--weights", str(weights)])
    assert code == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "junk.mp4" in err and "1 of 2 inputs upscaled" in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["clip.mp4"]


def test_interrupt_leaves_the_previous_output_in_place(tmp_path, model, monkeypatch):
    clip = tmp_path / "clip.mkv"
    make_clip(clip, audio=None)
    dst = tmp_path / "out.mkv"
    dst.write_bytes(b"a good earlier result")
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    from dsclora.infer import video as video_module

    real = pipeline_module.upscale_batch
    monkeypatch.setattr(video_module, "upscale_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        upscale_video(Upscaler(merge_span(model)), clip, dst, VideoOptions(codec="ffv1"), progress=False)
    assert dst.read_bytes() == b"a good earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mkv", "out.mkv"]


def test_missing_pyav_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(VideoError, match=r'pip install "dsclora\[video\]"'):
        require_av()
