"""SPAN (Swift Parameter-free Attention Network), the backbone DSCLoRA fine-tunes (SPEC §2)."""
import torch
import torch.nn.functional as F
from torch import nn

from .conv3xc import Conv3XC

DEFAULT_RGB_MEAN = (0.4488, 0.4371, 0.4040)
#: Feature maps ``SPAN.forward(x, return_features=...)`` returns for distillation (SPEC §4):
#: "blocks": the six block outputs F1..F6; "dscf": the nine maps the authors' released DSCF code
#: returns, h1 = silu(c1_r(x)), h2 = silu(c2_r(h1)) and o3 = c3_r(h2) of blocks 1, 2 and 3.
FEATURE_SETS = ("blocks", "dscf")
#: Blocks whose inner maps (h1, h2, o3) the "dscf" set distils.
DSCF_FEATURE_BLOCKS = 3


class SPAB(nn.Module):
    """Swift parameter-free attention block: (B, C, H, W) -> (out, h1), both (B, C, H, W).

    ``h1 = silu(c1_r(x))`` is returned post-activation, as the official code's in-place
    SiLU does (SPEC §2 quirk); SPAN concatenates block_6's ``h1``. With ``fused`` set
    (``SPAN.use_fused_blocks``) the block runs as the one op ``dsclora_kernels.spab`` on the
    convolutions' eval-form weights, differentiable w.r.t. them; the plain path is the spec.
    """

    def __init__(self, channels: int, form: str = "train"):
        super().__init__()
        self.c1_r = Conv3XC(channels, channels, form=form)
        self.c2_r = Conv3XC(channels, channels, form=form)
        self.c3_r = Conv3XC(channels, channels, form=form)
        self.fused = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            import dsclora_kernels  # lazily: the kernels package is only needed here

            weights = [*self.c1_r.weight_and_bias(), *self.c2_r.weight_and_bias(), *self.c3_r.weight_and_bias()]
            # in x's dtype, as autocast would cast them for F.conv2d (a no-op otherwise)
            return dsclora_kernels.spab(x, *(t.to(x.dtype) for t in weights))
        out, h1, _, _ = self.forward_inner(x)
        return out, h1

    def forward_inner(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(out, h1, h2, o3), each (B, C, H, W): the block output and its three convolutions'
        outputs (h1, h2 after their SiLU, o3 before the attention); always the plain path."""
        h1 = F.silu(self.c1_r(x))
        h2 = F.silu(self.c2_r(h1))
        o3 = self.c3_r(h2)
        return (o3 + x) * (torch.sigmoid(o3) - 0.5), h1, h2, o3


class SPAN(nn.Module):
    """SPAN super-resolution network: (B, in_channels, H, W) in [0, 1] -> (B, out_channels, sH, sW).

    ``form="train"`` builds Conv3XC training branches, ``form="eval"`` only the collapsed
    3x3 convs (the layout of the released checkpoints). The output is not clamped.
    """

    def __init__(
        self,
        feature_channels: int,
        cat_channels: int | None = None,
        upscale: int = 4,
        in_channels: int = 3,
        out_channels: int = 3,
        img_range: float = 255.0,
        rgb_mean: tuple[float, ...] | None = None,
        form: str = "train",
    ):
        super().__init__()
        c, cc = feature_channels, cat_channels or feature_channels
        if rgb_mean is None:
            rgb_mean = DEFAULT_RGB_MEAN if in_channels == 3 else (0.0,) * in_channels
        if len(rgb_mean) != in_channels:
            raise ValueError(f"rgb_mean has {len(rgb_mean)} values for {in_channels} input channels")
        self.feature_channels, self.cat_channels, self.upscale = c, cc, upscale
        self.in_channels, self.out_channels, self.img_range = in_channels, out_channels, img_range
        self.register_buffer("mean", torch.tensor(rgb_mean).view(1, -1, 1, 1), persistent=False)
        self.conv_1 = Conv3XC(in_channels, c, form=form)
        for i in range(1, 7):
            setattr(self, f"block_{i}", SPAB(c, form=form))
        self.conv_cat = nn.Conv2d(4 * c, cc, 1)
        self.conv_2 = Conv3XC(c, c, form=form)
        self.upsampler = nn.Sequential(
            nn.Conv2d(cc, out_channels * upscale**2, 3, padding=1), nn.PixelShuffle(upscale)
        )

    @property
    def blocks(self) -> list[SPAB]:
        return [getattr(self, f"block_{i}") for i in range(1, 7)]

    def forward(self, x: torch.Tensor, return_features: bool | str = False):
        """SR image; with ``return_features`` also a list of (B, C, H, W) feature maps: one of
        FEATURE_SETS (``True`` means "blocks"). The "dscf" maps of blocks 1-3 come from the plain
        path, since the fused op returns only (out, h1) (the fallback is logged once)."""
        feature_set = "blocks" if return_features is True else return_features
        if feature_set and feature_set not in FEATURE_SETS:
            raise ValueError(f"return_features must be a bool or one of {FEATURE_SETS}, got {return_features!r}")
        f0 = self.conv_1((x - self.mean) * self.img_range)
        outputs, features, h = [], [], f0
        for index, block in enumerate(self.blocks):
            if feature_set == "dscf" and index < DSCF_FEATURE_BLOCKS:
                if block.fused:
                    from dsclora_kernels import fallback

                    fallback("spab:dscf-features", "the DSCF feature set needs h2 and o3 of blocks 1-3, "
                             "which the fused op does not return; those blocks run the plain path")
                h, h1, h2, o3 = block.forward_inner(h)
                features += [h1, h2, o3]
            else:
                h, h1 = block(h)
            outputs.append(h)
        cat = torch.cat([f0, self.conv_2(outputs[-1]), outputs[0], h1], dim=1)
        out = self.upsampler(self.conv_cat(cat))
        if not feature_set:
            return out
        return out, (outputs if feature_set == "blocks" else features)

    def use_fused_blocks(self, enabled: bool = True) -> "SPAN":
        """Run every SPAB as the fused op ``dsclora_kernels.spab`` (or not); returns self."""
        for block in self.blocks:
            block.fused = enabled
        return self

    def reparameterize(self) -> "SPAN":
        """Collapse every Conv3XC into its 3x3 ``eval_conv`` for good; returns self."""
        for m in self.modules():
            if isinstance(m, Conv3XC):
                m.reparameterize()
        return self
