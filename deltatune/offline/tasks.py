"""Small offline downstream tasks (no downloads): real handwritten digits plus generated VTAB-style structured tasks.

Each task gives a few hundred to a thousand training images, in the spirit of VTAB-1k (Zhai et al., "A Large-scale
Study of Representation Learning with the Visual Task Adaptation Benchmark", https://arxiv.org/abs/1910.04867):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images), upsampled; 10 classes.
- ``digits-shift``: the same digits with random ink colour, textured backgrounds and inversion; 10 classes.
- ``count``: how many shapes (1-6) are in the image; 6 classes.
- ``location``: which cell of a 3x3 grid holds the big blob, among faint distractor dots and noise; 9 classes.
- ``orientation``: the angle of a bar, in 8 bins of 22.5 degrees; 8 classes.

All are deterministic by seed. Items are ``(image (3, H, W) float in [0, 1], label)``.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from deltatune.errors import DeltaTuneError

_TRAIN_SIZE, _TEST_SIZE = 800, 400  # generated tasks
_DIGITS_TEST_SIZE = 797  # 1000 train / 797 test


class ImageTensorDataset(Dataset):
    """Images kept as one uint8 tensor (small in memory at any image size), served as floats in [0, 1]."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        """Quantises ``images`` (N, 3, H, W) in [0, 1] to uint8; ``labels`` is (N,)."""
        self.images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        self.labels = labels.long()

    def __len__(self) -> int:
        """Number of images."""
        return self.labels.numel()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Returns ``(image (3, H, W) float in [0, 1], label)``."""
        return self.images[index].float() / 255, int(self.labels[index])


def _grid(n: int, size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates in [0, 1], shaped (1, H, W) to broadcast against per-image (N, 1, 1) parameters."""
    c = (torch.arange(size) + 0.5) / size
    return c[None, None, :].expand(1, size, size), c[None, :, None].expand(1, size, size)


def _coverage(signed_dist: Tensor, size: int) -> Tensor:
    """Anti-aliased ink from a signed distance (negative inside), one pixel wide edge."""
    return (0.5 - signed_dist * size).clamp(0, 1)


def _balanced_labels(n: int, num_classes: int, gen: torch.Generator) -> Tensor:
    """Labels with every class equally often (up to one), shuffled."""
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=gen)]


def _colourise(ink: Tensor, gen: torch.Generator, noise: float = 0.0) -> Tensor:
    """Paints ink (N, H, W) bright on a random dark background, with optional Gaussian pixel noise."""
    n = ink.shape[0]
    fg = 0.6 + 0.4 * torch.rand(n, 3, 1, 1, generator=gen)
    bg = 0.3 * torch.rand(n, 3, 1, 1, generator=gen)
    img = bg + (fg - bg) * ink[:, None]
    if noise:
        img = img + noise * torch.randn(img.shape, generator=gen)
    return img.clamp(0, 1)


def _render_count(n: int, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draws 1-6 discs, squares or triangles per image; the label is the count minus one.

    Shapes sit in distinct cells of a hidden 4x4 grid, jittered inside their cell, so that they never touch.
    """
    labels = _balanced_labels(n, 6, gen)
    cells = torch.rand(n, 16, generator=gen).argsort(1)[:, :6]  # (N, 6) distinct cells per image
    present = torch.arange(6)[None] <= labels[:, None]  # (N, 6) first count slots are drawn
    r = (0.05 + 0.05 * torch.rand(n, 6, generator=gen))[..., None, None]  # (N, 6, 1, 1)
    jitter = r[:, :, None] + (0.25 - 2 * r[:, :, None]) * torch.rand(n, 6, 2, 1, 1, generator=gen)
    xs, ys = _grid(n, size)
    dx = xs[:, None] - ((cells % 4)[..., None, None] / 4 + jitter[:, :, 0])  # (N, 6, H, W)
    dy = ys[:, None] - ((cells // 4)[..., None, None] / 4 + jitter[:, :, 1])
    s = math.sqrt(3) / 2
    disc = torch.sqrt(dx**2 + dy**2) - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.8 * r
    triangle = torch.maximum(dy - 0.5 * r, (s * dx.abs() - 0.5 * dy) - 0.5 * r)  # three half-planes
    kind = torch.randint(3, (n, 6, 1, 1), generator=gen)
    d = torch.where(kind == 0, disc, torch.where(kind == 1, square, triangle))
    ink = (_coverage(d, size) * present[..., None, None]).amax(1)
    return _colourise(ink, gen), labels


def _render_location(n: int, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Puts one big blob in a 3x3 grid cell among small faint distractor dots; the label is the cell index."""
    labels = _balanced_labels(n, 9, gen)
    xs, ys = _grid(n, size)
    r = 0.07 + 0.03 * torch.rand(n, 1, 1, generator=gen)
    # Blob centre anywhere in its cell that keeps the whole blob inside the cell.
    offset = r[:, None] + (1 / 3 - 2 * r[:, None]) * torch.rand(n, 2, 1, 1, generator=gen)
    cx = (labels % 3)[:, None, None] / 3 + offset[:, 0]
    cy = (labels // 3)[:, None, None] / 3 + offset[:, 1]
    ink = _coverage(torch.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) - r, size)
    dots = torch.rand(n, 6, 2, 1, 1, generator=gen)  # (N, 6 dots, xy, 1, 1)
    dist = torch.sqrt((xs[:, None] - dots[:, :, 0]) ** 2 + (ys[:, None] - dots[:, :, 1]) ** 2) - 0.025
    ink = torch.maximum(ink, 0.5 * _coverage(dist, size).amax(1))
    return _colourise(ink, gen, noise=0.08), labels


def _render_orientation(n: int, size: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draws a bar at an angle in [0, 180) degrees; the label is the angle's 22.5-degree bin."""
    labels = _balanced_labels(n, 8, gen)
    angle = (labels + torch.rand(n, generator=gen)) * math.pi / 8
    u = torch.stack([angle.cos(), angle.sin()], 1)[..., None, None]  # (N, 2, 1, 1) bar direction
    centre = 0.5 + 0.1 * (torch.rand(n, 2, 1, 1, generator=gen) * 2 - 1)
    half_len = 0.25 + 0.1 * torch.rand(n, 1, 1, generator=gen)
    half_width = 0.03 + 0.03 * torch.rand(n, 1, 1, generator=gen)
    # y grows downwards in images; flipping it makes the angle counter-clockwise as seen.
    dx, dy = _grid(n, size)[0] - centre[:, 0], centre[:, 1] - _grid(n, size)[1]
    along, across = dx * u[:, 0] + dy * u[:, 1], -dx * u[:, 1] + dy * u[:, 0]
    d = torch.maximum(along.abs() - half_len, across.abs() - half_width)
    return _colourise(_coverage(d, size), gen, noise=0.05), labels


def _load_digits(size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Upsampled 8x8 scikit-learn digits as (N, H, W) ink in [0, 1], split stratified 1000/797 by seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    ink = torch.from_numpy(digits.images).float()[:, None] / 16  # (1797, 1, 8, 8)
    ink = F.interpolate(ink, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    labels = torch.from_numpy(digits.target).long()
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=_DIGITS_TEST_SIZE, stratify=labels.numpy(), random_state=seed
    )
    return ink[train_idx], labels[train_idx], ink[test_idx], labels[test_idx]


def _shift(ink: Tensor, gen: torch.Generator) -> Tensor:
    """Domain shift for digits: random inversion, coloured ink, striped and noisy coloured backgrounds."""
    n, size = ink.shape[0], ink.shape[-1]
    invert = torch.rand(n, 1, 1, generator=gen) < 0.5
    ink = torch.where(invert, 1 - ink, ink)
    xs, ys = _grid(n, size)
    theta = math.pi * torch.rand(n, 1, 1, generator=gen)
    freq = 2 + 6 * torch.rand(n, 1, 1, generator=gen)
    stripes = 0.5 + 0.5 * torch.sin(2 * math.pi * freq * (xs * theta.cos() + ys * theta.sin()))  # (N, H, W)
    bg_a, bg_b = torch.rand(n, 3, 1, 1, generator=gen), torch.rand(n, 3, 1, 1, generator=gen)
    bg = bg_a + (bg_b - bg_a) * stripes[:, None] + 0.1 * torch.randn(n, 3, size, size, generator=gen)
    fg = torch.rand(n, 3, 1, 1, generator=gen)
    return (bg + (fg - bg) * ink[:, None]).clamp(0, 1)


_GENERATED: dict[str, tuple[Callable[[int, int, torch.Generator], tuple[Tensor, Tensor]], int]] = {
    "count": (_render_count, 6),
    "location": (_render_location, 9),
    "orientation": (_render_orientation, 8),
}
TASKS: list[str] = ["digits", "digits-shift", *_GENERATED]


def make_task(name: str, seed: int = 0, image_size: int = 32) -> tuple[Dataset, Dataset, int]:
    """Builds an offline task's train and test sets.

    Args:
        name: One of :data:`TASKS`.
        seed: Seed for the split (digits) or the generated images; the same seed gives identical tensors.
        image_size: Side length of the square images.

    Returns:
        ``(train_ds, test_ds, num_classes)``.

    Raises:
        DeltaTuneError: If ``name`` is not a known task.
    """
    if name not in TASKS:
        raise DeltaTuneError(f"Unknown offline task {name!r}; choose one of {', '.join(TASKS)}.")
    gen = torch.Generator().manual_seed(seed)
    if name in ("digits", "digits-shift"):
        x_tr, y_tr, x_te, y_te = _load_digits(image_size, seed)
        if name == "digits":
            x_tr, x_te = x_tr[:, None].expand(-1, 3, -1, -1), x_te[:, None].expand(-1, 3, -1, -1)
        else:
            x_tr, x_te = _shift(x_tr, gen), _shift(x_te, gen)
        return ImageTensorDataset(x_tr, y_tr), ImageTensorDataset(x_te, y_te), 10
    render, num_classes = _GENERATED[name]
    train = ImageTensorDataset(*render(_TRAIN_SIZE, image_size, gen))
    test = ImageTensorDataset(*render(_TEST_SIZE, image_size, gen))
    return train, test, num_classes
