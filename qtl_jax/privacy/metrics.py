"""Image-reconstruction quality: PSNR and Gaussian-window SSIM (Wang et al. 2004), numpy, per image.

Both take batches ``[N, H, W, C]`` (or a single ``[H, W, C]`` image) of floats on a known ``data_range``
and return one value per image, so callers can report means and spreads.

SSIM follows the paper's recommended setting, which is also what
``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=...)`` computes: local statistics under an 11-tap Gaussian
window (sigma 1.5, truncated at 3.5 sigma and renormalised), K1 = 0.01, K2 = 0.03, the SSIM map
averaged over the positions where the whole window fits inside the image, then over channels.
"""

from __future__ import annotations

import numpy as np

K1 = 0.01
K2 = 0.03


def _as_batch(a: np.ndarray, b: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{name}: images must have the same shape, got {a.shape} and {b.shape}.")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"{name}: expected [N, H, W, C] or [H, W, C] images, got shape {a.shape}.")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError(f"{name}: images contain NaN or inf; check the reconstruction before scoring it.")
    return a, b


def _check_range(data_range: float, name: str) -> float:
    if not np.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"{name}: data_range must be a positive number (1.0 for [0, 1] images), got {data_range}.")
    return float(data_range)


def psnr(reference: np.ndarray, test: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image: 10 log10(data_range^2 / MSE); inf for identical images."""
    data_range = _check_range(data_range, "psnr")
    a, b = _as_batch(reference, test, "psnr")
    mse = np.mean(np.square(a - b), axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def gaussian_kernel(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
    """The normalised 1-D Gaussian taps, radius int(truncate*sigma + 0.5) (11 taps for sigma 1.5)."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}.")
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_valid(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    # Separable 'valid' filtering over H and W of [N, H, W, C]: only windows that lie inside the image,
    # which is the region skimage averages over (it crops the window's radius from every border).
    k = len(taps)
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(taps[i] * x[:, i:i + h] for i in range(k))
    return sum(taps[j] * rows[:, :, j:j + w] for j in range(k))


def ssim(reference: np.ndarray, test: np.ndarray, data_range: float = 1.0, sigma: float = 1.5) -> np.ndarray:
    """Mean structural similarity per image (Gaussian window), averaged over channels; in [-1, 1]."""
    data_range = _check_range(data_range, "ssim")
    a, b = _as_batch(reference, test, "ssim")
    taps = gaussian_kernel(sigma)
    if min(a.shape[1], a.shape[2]) < len(taps):
        raise ValueError(
            f"ssim: images of {a.shape[1]}x{a.shape[2]} are smaller than the {len(taps)}-pixel Gaussian window; "
            "use images of at least that size or a smaller sigma."
        )
    c1 = (K1 * data_range) ** 2
    c2 = (K2 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, taps), _filter_valid(b, taps)
    var_a = _filter_valid(a * a, taps) - mu_a * mu_a
    var_b = _filter_valid(b * b, taps) - mu_b * mu_b
    cov = _filter_valid(a * b, taps) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return np.mean(num / den, axis=(1, 2, 3))
