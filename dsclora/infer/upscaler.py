"""``load`` and ``Upscaler``: upscale tensors, numpy arrays and PIL images with a merged SPAN."""
import warnings

import numpy as np
import torch
from torch import nn

from dsclora.models import load_model

from .merge import MergedSpan, merge_span
from .network import FusedSpan
from .tiling import RECEPTIVE_RADIUS, auto_tile, memory_budget, upscale_adaptive
from .weights import fetch

DEFAULT_TILE_PAD = RECEPTIVE_RADIUS + 3


def load(weights=None, device=None, dtype=None) -> "Upscaler":
    """An Upscaler for ``weights``: a checkpoint path, a state dict, a SPAN module (with or
    without ConvLoRA adapters, either Conv3XC form; not modified) or None (the default DSCF x4,
    downloaded once). ``device`` defaults to CUDA when available; ``dtype`` to float16 on CUDA,
    float32 elsewhere."""
    if weights is None:
        weights = fetch()
    model = weights if isinstance(weights, nn.Module) else load_model(weights)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available here")
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    return Upscaler(merge_span(model), device, dtype)


class Upscaler:
    """Upscales images by ``scale`` with a MergedSpan on ``device`` in ``dtype``.

    ``upscaler(image)`` takes a tensor (B, C, H, W) or (C, H, W), a numpy array (H, W) or
    (H, W, C) (uint8, uint16 or float in [0, 1]) or a PIL image, and returns the same kind.
    C = 3 is RGB; C = 1 gray and the alpha of C = 2 / 4 are run through the network replicated
    to RGB and averaged back (a constant alpha is simply repeated). Tensors come back raw (not
    clamped, like the SPAN module); arrays and images clamped and in their input's dtype/mode.
    Output non-finite in float16/bfloat16 is recomputed in float32 (with a warning). ``tile``
    (None: whole image; "auto": from the memory model ``tiling.auto_tile`` and the device's
    free memory or CPU budget) with ``tile_pad`` >= RECEPTIVE_RADIUS context gives the same
    output; on GPU out-of-memory the tile is halved automatically.
    """

    def __init__(self, merged: MergedSpan, device="cpu", dtype=torch.float32,
                 tile: int | str | None = None, tile_pad: int = DEFAULT_TILE_PAD):
        self.merged, self.tile, self.tile_pad = merged, tile, tile_pad
        self.network = FusedSpan(merged, device, dtype)
        self._fp32 = self.network if dtype == torch.float32 else None

    @property
    def scale(self) -> int:
        return self.merged.scale

    @property
    def device(self) -> torch.device:
        return self.network.device

    def __call__(self, image):
        if isinstance(image, torch.Tensor):
            return self.upscale_tensor(image)
        if isinstance(image, np.ndarray):
            return self.upscale_array(image)
        if _is_pil(image):
            return self.upscale_pil(image)
        raise TypeError(f"expected a torch.Tensor, numpy array or PIL image, got {type(image).__name__}")

    def upscale_tensor(self, x: torch.Tensor, any_layout: bool = False) -> torch.Tensor:
        """(B, C, H, W) or (C, H, W) float, C in 1..4 -> (B, C, sH, sW) on x's device, not clamped,
        in x's memory format; ``any_layout``: in the network's (channels_last on the fused path),
        saving a copy for callers that convert the result anyway.

        Empty or non-finite (NaN, inf) input raises ValueError."""
        if x.dim() == 3:
            return self.upscale_tensor(x[None], any_layout)[0]
        y = self._upscale_planes(x)
        if any_layout:
            return y
        channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def _upscale_planes(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 2, 3, 4) or not x.is_floating_point():
            raise ValueError(f"expected a float tensor (B, C, H, W) with C in 1..4, got "
                             f"{x.dtype} {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"expected a non-empty image, got shape {tuple(x.shape)}")
        finite = torch.isfinite(x)
        if not finite.all():
            raise ValueError(f"the input holds {int(finite.numel() - finite.sum())} non-finite "
                             "values (NaN or inf); the upscaled image would not be defined there")
        color = 3 if x.shape[1] >= 3 else 1
        planes = [self._upscale_color(x[:, :color])]
        if x.shape[1] > color:
            planes.append(self._upscale_gray(x[:, color:]))
        return torch.cat(planes, dim=1) if len(planes) > 1 else planes[0]

    def upscale_array(self, image: np.ndarray) -> np.ndarray:
        """(H, W) or (H, W, C) uint8/uint16/float -> (sH, sW[, C]) of the same dtype, clamped."""
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 2, 3, 4)):
            raise ValueError(f"expected an image array (H, W) or (H, W, C) with C in 1..4, "
                             f"got shape {image.shape}")
        peak = _PEAKS.get(image.dtype.type)
        if peak is None and not np.issubdtype(image.dtype, np.floating):
            raise ValueError(f"unsupported image dtype {image.dtype} (uint8, uint16 or float)")
        planes = image if image.ndim == 3 else image[:, :, None]
        x = torch.from_numpy(np.ascontiguousarray(planes, dtype=np.float32)).permute(2, 0, 1)
        y = self.upscale_tensor(x / peak if peak else x, any_layout=True).clamp_(0, 1).permute(1, 2, 0)
        y = y.reshape(y.shape[:2]) if image.ndim == 2 else y
        if peak:
            return (y * peak).round_().cpu().numpy().astype(image.dtype)
        return y.cpu().numpy().astype(image.dtype)

    def upscale_pil(self, image):
        """A PIL image upscaled, in its mode (16-bit and 'F' included; others as RGB[A])."""
        from PIL import Image

        mode = image.mode
        if mode not in ("RGB", "RGBA", "L", "LA", "I;16", "I", "F"):
            mode = "RGBA" if "transparency" in image.info or "A" in mode else "RGB"
            image = image.convert(mode)
        array = np.asarray(image)
        if mode == "I":  # 32-bit int mode: how Pillow opens 16-bit PNGs
            array = np.clip(array, 0, 65535).astype(np.uint16)
        out = self.upscale_array(array)
        return Image.fromarray(out.astype(np.int32) if mode == "I" else out)

    def _upscale_color(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return self._upscale_gray(x)
        return upscale_adaptive(self._forward, x, self.scale, self.tile_for(x.shape), self.tile_pad)

    def upscale_video(self, src, dst, **options) -> int:
        """Upscale the video ``src`` into ``dst``; see ``dsclora.infer.video.upscale_video``
        (options: ``options=VideoOptions(...)``, ``batch``, ``out_scale``, ``progress``)."""
        from .video import upscale_video

        return upscale_video(self, src, dst, **options)

    def tile_for(self, shape) -> int | None:
        """The tile for an input of ``shape`` (B, C, H, W): ``tile``, or the automatic one."""
        if self.tile != "auto":
            return self.tile
        features = self.merged.conv_1[0].shape[0]
        itemsize = torch.finfo(self.network.dtype).bits // 8
        budget = memory_budget(self.device)
        return auto_tile(shape, features, self.scale, itemsize, budget, self.tile_pad)

    def _upscale_gray(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) through the network as gray RGB, averaged back to one channel."""
        lo, hi = x.aminmax()
        if lo == hi:  # e.g. a fully opaque alpha: nothing to upscale
            return x.repeat_interleave(self.scale, 2).repeat_interleave(self.scale, 3)
        return self._upscale_color(x.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """One tile through the network, recomputed in float32 if the output is not finite."""
        y = self.network(x)
        if self.network.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(y).all():
            warnings.warn(f"dsclora infer: non-finite output in {self.network.dtype}, "
                          "recomputing in float32", RuntimeWarning, stacklevel=2)
            if self._fp32 is None:
                self._fp32 = FusedSpan(self.merged, self.device, torch.float32)
            y = self._fp32(x)
        return y.to(x.device, x.dtype)


_PEAKS = {np.uint8: 255.0, np.uint16: 65535.0}


def _is_pil(obj) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(obj, Image.Image)
