"""Deterministic generated labelled data for training the tiny benchmark models.

Caching methods can only be judged on trained models, and trained models need data whose labels
can be recovered from a sample. Eight classes combine shape, colour, texture and background; pairs
of classes share a background so a model has to learn the foreground too. Every sample jitters
position, size, rotation, colours and a background gradient, so a class is a distribution, not a
template. Clips move the object along a class-specific direction (stripes move their phase).
Everything comes from a seeded torch.Generator: same seed, same tensors.
"""
import math

import torch

SIZE = 32
FRAMES = 4

# name, shape, texture, foreground RGB, background RGB
CLASSES = [
    ("red_circle", "circle", "solid", (0.90, 0.15, 0.15), (0.10, 0.12, 0.35)),
    ("yellow_square_stripes", "square", "stripes", (0.95, 0.85, 0.20), (0.10, 0.12, 0.35)),
    ("blue_triangle", "triangle", "solid", (0.15, 0.30, 0.90), (0.92, 0.86, 0.70)),
    ("green_ring", "ring", "solid", (0.10, 0.65, 0.20), (0.92, 0.86, 0.70)),
    ("white_cross", "cross", "solid", (0.95, 0.95, 0.95), (0.12, 0.32, 0.16)),
    ("magenta_diamond_checker", "diamond", "checker", (0.85, 0.20, 0.75), (0.12, 0.32, 0.16)),
    ("cyan_stripes", "stripes", "solid", (0.15, 0.80, 0.85), (0.70, 0.70, 0.74)),
    ("purple_square_dots", "square", "dots", (0.50, 0.20, 0.70), (0.70, 0.70, 0.74)),
]
NUM_CLASSES = len(CLASSES)
CLASS_NAMES = [c[0] for c in CLASSES]


def _uniform(gen, lo, hi, shape=()):
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def _coverage(sdf):
    """Anti-aliased coverage of a signed distance (in pixels): 1 inside, 0 outside, 1 px ramp."""
    return (0.5 - sdf).clamp(0.0, 1.0)


def _shape_sdf(shape, dx, dy, r):
    """Signed distance (pixels, approximate) of a shape of radius r centred at the origin."""
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    if shape == "ring":
        return (torch.sqrt(dx * dx + dy * dy) - r).abs() - 0.3 * r
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    if shape == "diamond":
        return (dx.abs() + dy.abs()) / math.sqrt(2.0) - 0.8 * r
    if shape == "triangle":  # pointing up (y grows downwards)
        s, c = math.sin(math.pi / 3), math.cos(math.pi / 3)
        edges = torch.stack([dy, s * dx - c * dy, -s * dx - c * dy])
        return edges.amax(0) - 0.55 * r
    if shape == "cross":
        arm = 0.33 * r
        bar_h = torch.maximum(dx.abs() - r, dy.abs() - arm)
        bar_v = torch.maximum(dx.abs() - arm, dy.abs() - r)
        return torch.minimum(bar_h, bar_v)
    raise ValueError(shape)


def _texture(texture, u, v, period):
    """Multiplicative texture in object coordinates (u, v): 1 = full colour."""
    if texture == "solid":
        return torch.ones_like(u)
    if texture == "stripes":
        return 0.35 + 0.65 * (torch.sin(2 * math.pi * v / period) > 0).float()
    if texture == "checker":
        cell = (torch.floor(u / period) + torch.floor(v / period)) % 2
        return 0.45 + 0.55 * cell
    if texture == "dots":
        fu = u / period - torch.floor(u / period) - 0.5
        fv = v / period - torch.floor(v / period) - 0.5
        return 1.0 - 0.6 * _coverage((torch.sqrt(fu * fu + fv * fv) - 0.25) * period)
    raise ValueError(texture)


def _render(label, gen, frames):
    """One sample of class `label` as [3, frames, SIZE, SIZE] in [0, 1]; frames=1 is an image."""
    _, shape, texture, fg, bg = CLASSES[label]
    fg = (torch.tensor(fg) * _uniform(gen, 0.9, 1.1, (3,)) + _uniform(gen, -0.05, 0.05, (3,))).clamp(0, 1)
    bg = (torch.tensor(bg) * _uniform(gen, 0.9, 1.1, (3,)) + _uniform(gen, -0.05, 0.05, (3,))).clamp(0, 1)
    grad_angle = _uniform(gen, 0.0, 2 * math.pi)
    grad_amp = _uniform(gen, 0.0, 0.12)
    radius = _uniform(gen, 6.0, 10.0)
    rot = _uniform(gen, -0.25, 0.25)
    centre = _uniform(gen, 11.0, 21.0, (2,))
    period = _uniform(gen, 3.5, 5.0)
    speed = _uniform(gen, 2.0, 3.0)
    direction = 2 * math.pi * label / NUM_CLASSES
    velocity = speed * torch.stack([torch.tensor(math.cos(direction)), torch.tensor(math.sin(direction))])

    coords = torch.arange(SIZE, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    ramp = (x - SIZE / 2) * torch.cos(grad_angle) + (y - SIZE / 2) * torch.sin(grad_angle)
    background = bg[:, None, None] * (1.0 + grad_amp * ramp / (SIZE / 2))

    out = []
    for f in range(frames):
        offset = (f - (frames - 1) / 2) * velocity if frames > 1 else torch.zeros(2)
        cx, cy = centre + offset
        dx, dy = x - cx, y - cy
        u = dx * torch.cos(rot) + dy * torch.sin(rot)
        v = -dx * torch.sin(rot) + dy * torch.cos(rot)
        if shape == "stripes":
            # a full-frame stripe field whose stripes are normal to the motion direction
            phase = (dx * math.cos(direction) + dy * math.sin(direction))
            cover = 0.5 + 0.5 * torch.sin(2 * math.pi * phase / (1.6 * period))
            cover = (cover * 3.0 - 1.0).clamp(0.0, 1.0)
        else:
            cover = _coverage(_shape_sdf(shape, u, v, radius))
        colour = fg[:, None, None] * _texture(texture, u, v, period)
        out.append(background * (1 - cover) + colour * cover)
    return torch.stack(out, dim=1).clamp(0.0, 1.0)


def _labels(n, gen, labels):
    if labels is not None:
        return torch.as_tensor(labels, dtype=torch.long).reshape(n)
    return torch.randint(0, NUM_CLASSES, (n,), generator=gen)


def make_images(n, seed, labels=None):
    """n images [n, 3, 32, 32] in [0, 1] and their labels [n] (random unless given)."""
    gen = torch.Generator().manual_seed(seed)
    labels = _labels(n, gen, labels)
    images = torch.stack([_render(int(c), gen, 1)[:, 0] for c in labels])
    return images, labels


def make_clips(n, seed, labels=None, frames=FRAMES):
    """n clips [n, 3, frames, 32, 32] in [0, 1] and their labels [n] (random unless given)."""
    gen = torch.Generator().manual_seed(seed)
    labels = _labels(n, gen, labels)
    clips = torch.stack([_render(int(c), gen, frames) for c in labels])
    return clips, labels
