"""PCA lighting noise (AlexNet), the one train augmentation of the ST/ST++ ImageNet recipe timm lacks.

``add_lighting`` puts it into a timm train transform right before the tensor conversion (after
crop, flip, colour jitter, auto-augment), where the authors' pipeline has it. The noise is drawn
with torch's RNG, which timm's loader seeds per worker: runs stay deterministic given ``--seed``.

Note: the authors' ``Lighting`` adds the [0, 1]-scale noise to a 0-255 uint8 image and truncates,
so in their runs it moved pixels by at most one grey level; this one adds it on the 0-255 scale the
eigenvalues are meant for (``docs/method.md``).
"""
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

__all__ = ['Lighting', 'add_lighting', 'IMAGENET_PCA_EIGVAL', 'IMAGENET_PCA_EIGVEC']

# Principal components of ImageNet RGB pixels on the [0, 1] scale (AlexNet; fb.resnet.torch).
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203))

# timm's final conversions: lighting goes right before the first of them.
_TO_TENSOR = ('MaybeToTensor', 'MaybePILToTensor', 'ToTensor', 'PILToTensor', 'ToNumpy')


class Lighting:
    """Adds ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, alphastd)``, to every pixel of an RGB image."""

    def __init__(self, alphastd: float, eigval: Sequence[float] = IMAGENET_PCA_EIGVAL,
                 eigvec: Sequence[Sequence[float]] = IMAGENET_PCA_EIGVEC):
        if alphastd < 0:
            raise ValueError(f'lighting std must be >= 0, got {alphastd}')
        self.alphastd = float(alphastd)
        self.eigval = torch.tensor(eigval, dtype=torch.float64)
        self.eigvec = torch.tensor(eigvec, dtype=torch.float64)

    def offset(self) -> torch.Tensor:
        """One draw: the RGB offset on the [0, 1] scale."""
        alpha = torch.randn(3, dtype=torch.float64) * self.alphastd
        return self.eigvec @ (alpha * self.eigval)

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.alphastd == 0:
            return img
        if not isinstance(img, Image.Image) or img.mode != 'RGB':
            raise ValueError(f'lighting needs an RGB PIL image, got {getattr(img, "mode", type(img).__name__)}')
        shifted = np.asarray(img, dtype=np.float64) + self.offset().numpy() * 255.0
        return Image.fromarray(np.clip(np.rint(shifted), 0, 255).astype(np.uint8), 'RGB')

    def __repr__(self) -> str:
        return f'{type(self).__name__}(alphastd={self.alphastd})'


def add_lighting(transform: T.Compose, alphastd: float) -> T.Compose:
    """``transform`` (a timm train Compose) with ``Lighting(alphastd)`` before its tensor conversion."""
    if not alphastd:
        return transform
    if not isinstance(transform, T.Compose):
        raise TypeError(f'add_lighting needs a torchvision Compose, got {type(transform).__name__}')
    steps = list(transform.transforms)
    at = next((i for i, t in enumerate(steps) if type(t).__name__ in _TO_TENSOR), len(steps))
    return T.Compose(steps[:at] + [Lighting(alphastd)] + steps[at:])
