"""Exactly invertible map between RGB images and 16-channel latents (no learned VAE).

An image in [0, 1] of size HxW becomes a latent of size H/2 x W/2: pixel-unshuffle by 2 gives
12 channels (values scaled to [-1, 1]); 4 zero channels pad it to the 16 that Wan and Flux expect.
Videos ([B, 3, T, H, W]) map frame by frame to [B, 16, T, H/2, W/2].
This is the LATENT the host's samplers see (VAE space); the model space is the host's
`process_latent_in` of it, as for a real VAE latent.
"""
import torch
import torch.nn.functional as F

LATENT_CHANNELS = 16
FACTOR = 2
_USED = 3 * FACTOR * FACTOR


def image_to_latent(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] or [B, 3, T, H, W] in [0, 1] -> latent [B, 16, (T,) H/2, W/2]."""
    if images.ndim == 5:
        b, c, t, h, w = images.shape
        frames = images.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        lat = image_to_latent(frames)
        return lat.reshape(b, t, LATENT_CHANNELS, h // FACTOR, w // FACTOR).permute(0, 2, 1, 3, 4)
    x = F.pixel_unshuffle(images * 2.0 - 1.0, FACTOR)
    pad = x.new_zeros(x.shape[0], LATENT_CHANNELS - _USED, *x.shape[2:])
    return torch.cat([x, pad], dim=1)


def latent_to_image(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of image_to_latent (padding channels are ignored); output clamped to [0, 1]."""
    if latent.ndim == 5:
        b, c, t, h, w = latent.shape
        frames = latent.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        img = latent_to_image(frames)
        return img.reshape(b, t, 3, h * FACTOR, w * FACTOR).permute(0, 2, 1, 3, 4)
    img = F.pixel_shuffle(latent[:, :_USED].float(), FACTOR)
    return ((img + 1.0) / 2.0).clamp(0.0, 1.0)


def frames(latent: torch.Tensor) -> torch.Tensor:
    """Decoded frames [N, 3, H, W] of an image or video latent: what fidelity metrics compare."""
    images = latent_to_image(latent)
    if images.ndim == 5:
        images = images.permute(0, 2, 1, 3, 4).flatten(0, 1)
    return images
