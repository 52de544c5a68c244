"""Y conversion and SSIM of float64 numpy planes in numpy: the specification (SPEC §7,
BasicSR's formulas), and the ``"reference"`` backend of ``rgb_to_y`` / ``ssim_mean``."""
import numpy as np
import torch

NAME = "reference"
WINDOW_SIZE, WINDOW_SIGMA = 11, 1.5
#: SSIM stabilisers for 0-255 samples: (0.01 * 255)^2 and (0.03 * 255)^2.
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
#: BT.601 luma weights of R, G, B (on [0, 1] samples) and offset, BasicSR's ``rgb2ycbcr``.
Y_WEIGHTS, Y_OFFSET = (65.481, 128.553, 24.966), 16.0


def gaussian_window(size: int = WINDOW_SIZE, sigma: float = WINDOW_SIGMA) -> np.ndarray:
    """1-D Gaussian (size,) float64 summing to 1; the SSIM window is its outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def rgb_to_y_reference(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 RGB with 0-255 samples -> (H, W) float64 Y (16..235 scale)."""
    r, g, b = (img[..., c] / 255.0 for c in range(3))
    return Y_OFFSET + Y_WEIGHTS[0] * r + Y_WEIGHTS[1] * g + Y_WEIGHTS[2] * b


def _correlate_valid(x: np.ndarray, window: np.ndarray, axis: int) -> np.ndarray:
    """'Valid' correlation of x with the 1-D window along ``axis``."""
    n = x.shape[axis] - window.size + 1
    return sum(w * x.take(range(t, t + n), axis=axis) for t, w in enumerate(window))


def ssim_mean_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM map of two (H, W) float64 planes with 0-255 samples."""
    window = gaussian_window()

    def blur(x):
        return _correlate_valid(_correlate_valid(x, window, 0), window, 1)

    mu_a, mu_b = blur(a), blur(b)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a, var_b, cov = blur(a * a) - mu_aa, blur(b * b) - mu_bb, blur(a * b) - mu_ab
    ssim_map = ((2 * mu_ab + C1) * (2 * cov + C2)) / ((mu_aa + mu_bb + C1) * (var_a + var_b + C2))
    return float(ssim_map.mean())



# ---- the "reference" backend ----

def status(device: torch.device) -> str:
    return "available"


def unsupported(*planes: np.ndarray) -> None:
    return None


rgb_to_y = rgb_to_y_reference
ssim_mean = ssim_mean_reference
