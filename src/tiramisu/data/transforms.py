"""Joint image/mask augmentation on top of ``torchvision.transforms.v2``.

v2 transforms apply the same random parameters to every tv_tensor in a call and resample masks
with nearest neighbour, which is exactly the joint behaviour segmentation needs; padding fills
images with 0 and masks with the ignore index so padded pixels never reach the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


class JointTransform:
    """Random scale, random crop (padded with ignore), flips, then optional mean/std."""

    def __init__(
        self,
        crop_size: Sequence[int] | None = None,
        hflip: bool = False,
        vflip: bool = False,
        scale_range: Sequence[float] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        ignore_index: int = 255,
    ) -> None:
        fill = {tv_tensors.Image: 0.0, tv_tensors.Mask: ignore_index}
        ops: list[v2.Transform] = []
        if scale_range is not None:
            lo, hi = (float(v) for v in scale_range)
            ops.append(
                v2.RandomAffine(
                    degrees=0.0,
                    scale=(lo, hi),
                    fill=fill,
                    interpolation=v2.InterpolationMode.BILINEAR,
                )
            )
        if crop_size is not None:
            ops.append(
                v2.RandomCrop(tuple(int(v) for v in crop_size), pad_if_needed=True, fill=fill)
            )
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        if vflip:
            ops.append(v2.RandomVerticalFlip())
        self.geometric = v2.Compose(ops) if ops else None
        self.normalize = v2.Normalize(list(mean), list(std)) if mean is not None else None

    def __call__(
        self, image: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.geometric is not None:
            image, target = self.geometric(tv_tensors.Image(image), tv_tensors.Mask(target))
            image = image.as_subclass(torch.Tensor)
            target = target.as_subclass(torch.Tensor)
        if self.normalize is not None:
            image = self.normalize(image)
        return image, target


CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]
CIFAR10_STD = [0.2470, 0.2435, 0.2616]


def normalization(
    kind: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> tuple[list[float] | None, list[float] | None]:
    """``unit`` (the paper: [0, 1] only), ``imagenet``, ``cifar10``, or ``mean_std`` with values."""
    if kind == "unit":
        return None, None
    if kind == "imagenet":
        return [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if kind == "cifar10":
        return list(CIFAR10_MEAN), list(CIFAR10_STD)
    if kind == "mean_std":
        if mean is None or std is None:
            raise ValueError("normalize: mean_std needs data.mean and data.std")
        return [float(v) for v in mean], [float(v) for v in std]
    raise ValueError(f"data.normalize must be unit, imagenet, cifar10 or mean_std, got {kind!r}")
