"""Linear-probe quality of an offline backbone: how well frozen features separate the real ``digits`` task.

The pretraining script records it in the weight file and a test re-measures it, so the claim "the shipped
weights beat a random init" is checked, not just stated.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from timm.models.vision_transformer import VisionTransformer

from deltatune.offline.backbone import OFFLINE_MEAN, OFFLINE_STD
from deltatune.offline.tasks import make_task


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Maps uint8 images (N, 3, H, W) to the offline backbone's normalised float input."""
    mean, std = torch.tensor(OFFLINE_MEAN)[:, None, None], torch.tensor(OFFLINE_STD)[:, None, None]
    return (images.float() / 255 - mean) / std


@torch.no_grad()
def features(model: VisionTransformer, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Pre-logits features (the normed class token) of uint8 images, as a numpy array (N, D)."""
    model.eval()
    out = [model.forward_head(model.forward_features(normalise(x)), pre_logits=True) for x in images.split(batch_size)]
    return torch.cat(out).numpy()


def digits_probe(model: VisionTransformer, seed: int = 0) -> float:
    """Test accuracy of a logistic-regression probe on frozen features for the offline ``digits`` task.

    The probe standardises the features and uses a fixed L2 strength (C=1), the same for every backbone.
    """
    train, test, _ = make_task("digits", seed=seed, image_size=model.patch_embed.img_size[0])
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    probe.fit(features(model, train.images), train.labels.numpy())
    return float(probe.score(features(model, test.images), test.labels.numpy()))


def random_probe(arch: dict, seeds: tuple[int, ...] = (0, 1, 2)) -> list[float]:
    """Digits probe accuracy of the same architecture at timm's random init, for several init seeds."""
    accs = []
    for s in seeds:
        torch.manual_seed(s)
        accs.append(digits_probe(VisionTransformer(**arch, num_classes=0)))
    return accs
