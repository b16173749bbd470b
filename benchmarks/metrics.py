"""Fidelity metrics between a cached and an uncached output of the same seed (images in [0, 1])."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """Mean SSIM over channels with a uniform window; inputs [N, C, H, W] in [0, 1]."""
    a, b = a.float(), b.float()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    pad = window // 2
    pool = lambda x: F.avg_pool2d(F.pad(x, (pad,) * 4, mode="reflect"), window, stride=1)
    mu_a, mu_b = pool(a), pool(b)
    var_a = pool(a * a) - mu_a ** 2
    var_b = pool(b * b) - mu_b ** 2
    cov = pool(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
