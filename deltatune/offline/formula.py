"""Formula-driven images: each class is a random iterated function system (IFS), rendered by the chaos game.

In the spirit of FractalDB (Kataoka et al., "Pre-training without Natural Images", ACCV 2020,
https://arxiv.org/abs/2101.08515): a class is a set of 2-4 affine maps ``x -> A_i x + b_i`` picked with
probabilities ``p_i ~ |det A_i|``; its attractor is drawn by iterating randomly chosen maps from many
starting points. Degenerate systems (non-contractive, or whose attractor fills too little or too much of the
image) are rejected with a filling-rate test, as FractalDB does. Samples of a class differ by a small jitter
of the IFS parameters, blur, colours and (optionally) flips. Everything is vectorised in torch and deterministic
by seed.
"""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

_MAX_MAPS = 4
_SUPERSAMPLE = 2  # render at 2x and average-pool down: cheap anti-aliasing


def sample_ifs(num_systems: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Draws random IFS parameters with 2-4 maps each, in FractalDB's uniform [-1, 1] parametrisation.

    Args:
        num_systems: How many systems to draw.
        generator: Source of randomness.

    Returns:
        ``(A, b, p)``: linear parts ``(S, 4, 2, 2)``, offsets ``(S, 4, 2)`` and map probabilities ``(S, 4)``;
        unused map slots have probability 0.
    """
    a = torch.rand(num_systems, _MAX_MAPS, 2, 2, generator=generator) * 2 - 1
    b = torch.rand(num_systems, _MAX_MAPS, 2, generator=generator) * 2 - 1
    num_maps = torch.randint(2, _MAX_MAPS + 1, (num_systems,), generator=generator)
    used = torch.arange(_MAX_MAPS)[None] < num_maps[:, None]  # (S, 4)
    return a, b, _map_probabilities(a, used)


def _map_probabilities(a: Tensor, used: Tensor) -> Tensor:
    """Picks map i with probability ~ |det A_i| so that each map covers its share of the attractor."""
    det = torch.linalg.det(a).abs().clamp_min(1e-3) * used
    return det / det.sum(-1, keepdim=True)


def render_ifs(
    a: Tensor, b: Tensor, p: Tensor, image_size: int, generator: torch.Generator, walkers: int = 96, steps: int = 48
) -> Tensor:
    """Draws the attractor of each IFS with the chaos game, fitted to the image; returns ink density in [0, 1].

    Args:
        a: Linear parts ``(N, M, 2, 2)``.
        b: Offsets ``(N, M, 2)``.
        p: Map probabilities ``(N, M)``.
        image_size: Output side length.
        generator: Source of randomness for the map choices.
        walkers: Independent chaos-game walkers per image.
        steps: Steps per walker; the first 8 are burn-in and not drawn.

    Returns:
        Density images ``(N, image_size, image_size)``; all zero where the system diverged.
    """
    n, m = a.shape[:2]
    burn_in = 8
    # One row of 6 coefficients per map, so that a step is one row lookup instead of gathers on (2, 2) blocks.
    table = torch.cat([a.flatten(2), b], -1).flatten(0, 1)  # (N * M, 6)
    offset = torch.arange(n)[:, None] * m
    cum_p = p.cumsum(-1)[:, None, :]  # (N, 1, M)
    x0, x1 = (torch.rand(2, n, walkers, generator=generator) * 2 - 1).unbind(0)  # (N, W) each
    points = []
    for step in range(steps):
        u = torch.rand(n, walkers, 1, generator=generator)
        idx = (u > cum_p).sum(-1).clamp_max(m - 1)  # (N, W) chosen map per walker
        c = table[idx + offset].unbind(-1)  # 6 x (N, W)
        x0, x1 = c[0] * x0 + c[1] * x1 + c[4], c[2] * x0 + c[3] * x1 + c[5]
        if step >= burn_in:
            points.append(torch.stack([x0, x1], -1))
    pts = torch.cat(points, 1)  # (N, P, 2)
    finite = (pts.abs() < 1e4).flatten(1).all(1)  # also False for NaN: diverged systems
    pts = torch.where(finite[:, None, None], pts, torch.zeros_like(pts))
    # Fit the attractor's bounding box into the image, keeping its aspect ratio.
    lo, hi = pts.amin(1, keepdim=True), pts.amax(1, keepdim=True)
    centre, extent = (lo + hi) / 2, (hi - lo).amax(-1, keepdim=True).clamp_min(1e-6)
    side = image_size * _SUPERSAMPLE
    pix = ((pts - centre) / extent * 0.9 + 0.5) * side
    pix = pix.long().clamp(0, side - 1)
    flat = pix[..., 1] * side + pix[..., 0] + torch.arange(n)[:, None] * side * side
    counts = torch.bincount(flat.flatten(), minlength=n * side * side).view(n, 1, side, side).float()
    ink = F.avg_pool2d((counts > 0).float(), _SUPERSAMPLE).squeeze(1)  # (N, H, W)
    return ink * finite[:, None, None]


def filling_rate(ink: Tensor) -> Tensor:
    """Fraction of pixels the attractor touches: FractalDB's test for degenerate systems."""
    return (ink > 0).float().mean((-2, -1))


def sample_good_ifs(
    num_classes: int, generator: torch.Generator, min_fill: float = 0.12, max_fill: float = 0.6, probe_size: int = 32
) -> tuple[Tensor, Tensor, Tensor]:
    """Draws IFS classes until ``num_classes`` pass the contractivity and filling-rate filters.

    Args:
        num_classes: Number of systems to keep.
        generator: Source of randomness.
        min_fill: Reject systems whose attractor covers less of the image (points collapsed to a curve or dot).
        max_fill: Reject systems covering more (noise-like blobs with no shape).
        probe_size: Resolution of the filter render.

    Returns:
        ``(A, b, p)`` as in :func:`sample_ifs`, with exactly ``num_classes`` systems.
    """
    kept: list[tuple[Tensor, Tensor, Tensor]] = []
    total = 0
    while total < num_classes:
        a, b, p = sample_ifs(64 * num_classes, generator)
        # Every used map must shrink distances (spectral norm < 1), or the chaos game diverges or smears into noise.
        contractive = ((torch.linalg.matrix_norm(a, ord=2) < 1) | (p == 0)).all(-1)
        a, b, p = a[contractive], b[contractive], p[contractive]  # ~5% survive; render only those
        fill = filling_rate(render_ifs(a, b, p, probe_size, generator))
        ok = (fill >= min_fill) & (fill <= max_fill)
        kept.append((a[ok], b[ok], p[ok]))
        total += int(ok.sum())
    a, b, p = (torch.cat(t)[:num_classes] for t in zip(*kept, strict=True))
    return a, b, p


def render_samples(
    a: Tensor,
    b: Tensor,
    p: Tensor,
    labels: Tensor,
    image_size: int,
    generator: torch.Generator,
    jitter: float = 0.05,
    max_blur: float = 1.5,
    flips: bool = False,
) -> Tensor:
    """Renders one augmented RGB image per label: jittered IFS parameters, random flips, blur and colours.

    Args:
        a: Class linear parts ``(C, M, 2, 2)``.
        b: Class offsets ``(C, M, 2)``.
        p: Class map probabilities ``(C, M)``.
        labels: Class of each sample ``(N,)``.
        image_size: Output side length.
        generator: Source of randomness.
        jitter: Standard deviation of the additive noise on every IFS parameter.
        max_blur: Largest Gaussian blur sigma in pixels (uniform per sample), so that the model also sees soft,
            thick strokes like those of natural and upsampled images, not only crisp point clouds.
        flips: Also flip samples at random, horizontally and vertically. Off by default: a model made invariant
            to flips cannot tell a 6 from a 9 or a 2 from a mirrored 5, which hurts transfer to digits.

    Returns:
        Images ``(N, 3, H, W)`` as uint8.
    """
    n = labels.numel()
    a_s = a[labels] + jitter * torch.randn(n, *a.shape[1:], generator=generator)
    b_s = b[labels] + jitter * torch.randn(n, *b.shape[1:], generator=generator)
    ink = render_ifs(a_s, b_s, p[labels], image_size, generator)  # (N, H, W)
    flip = (torch.rand(n, 2, generator=generator) < 0.5) & flips
    ink = torch.where(flip[:, 0, None, None], ink.flip(-1), ink)
    ink = torch.where(flip[:, 1, None, None], ink.flip(-2), ink)
    ink = _blur(ink, max_blur * torch.rand(n, generator=generator))
    # Bright ink on a darker background, with random hues so that shape, not colour, names the class.
    fg = 0.5 + 0.5 * torch.rand(n, 3, generator=generator)
    bg = 0.4 * torch.rand(n, 3, generator=generator) * (torch.rand(n, 1, generator=generator) < 0.5)
    img = bg[..., None, None] + (fg - bg)[..., None, None] * ink[:, None]
    return (img * 255).round().to(torch.uint8)


def _blur(ink: Tensor, sigma: Tensor, radius: int = 3) -> Tensor:
    """Blurs each image (N, H, W) with its own Gaussian sigma (N,), then restores its peak to 1."""
    n = ink.shape[0]
    x = torch.arange(-radius, radius + 1, dtype=ink.dtype)
    k = torch.exp(-(x**2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = k / k.sum(-1, keepdim=True)  # (N, 2r + 1)
    out = F.conv2d(ink[None], k[:, None, :, None], padding=(radius, 0), groups=n)  # separable: rows, then columns
    out = F.conv2d(out, k[:, None, None, :], padding=(0, radius), groups=n)[0]
    return out / out.amax((-2, -1), keepdim=True).clamp_min(1e-6)


class FractalDataset(Dataset):
    """A FractalDB-style classification set: ``per_class`` augmented renders of ``num_classes`` random IFS.

    The classes depend only on ``seed``; ``sample_seed`` (default ``seed``) draws the renders, so that a
    held-out set of the same classes is ``FractalDataset(..., seed=s, sample_seed=other)``.
    """

    def __init__(
        self,
        num_classes: int,
        per_class: int,
        image_size: int = 32,
        seed: int = 0,
        sample_seed: int | None = None,
        flips: bool = False,
    ) -> None:
        """Renders all images up front (uint8) so that ``__getitem__`` is a lookup; see :func:`render_samples`."""
        class_gen = torch.Generator().manual_seed(seed)
        self.ifs = sample_good_ifs(num_classes, class_gen)
        sample_gen = torch.Generator().manual_seed(seed if sample_seed is None else sample_seed)
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        labels = labels[torch.randperm(labels.numel(), generator=sample_gen)]
        chunks = [
            render_samples(*self.ifs, chunk, image_size, sample_gen, flips=flips)
            for chunk in labels.split(_chunk(image_size))
        ]
        self.images = torch.cat(chunks)  # (N, 3, H, W) uint8
        self.labels = labels
        self.num_classes = num_classes

    def __len__(self) -> int:
        """Number of images."""
        return self.labels.numel()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Returns ``(image (3, H, W) float in [0, 1], label)``."""
        return self.images[index].float() / 255, int(self.labels[index])


def _chunk(image_size: int) -> int:
    """Images per render call, so that the supersampled pixel buffers stay around 10 MB."""
    return max(16, 2**21 // (image_size * _SUPERSAMPLE) ** 2)
