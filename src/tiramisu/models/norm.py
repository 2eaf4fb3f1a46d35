"""BatchNorm with the paper's test-time mode: each image normalised by its own statistics."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` plus a ``per_image`` switch (off by default).

    The paper's authors evaluated one image at a time with BatchNorm in training mode; for a
    batch of one that is instance normalisation followed by BatchNorm's affine transform.
    With ``per_image`` on, ``F.instance_norm`` computes exactly that for any batch size (the
    result does not depend on which images share a batch), the running statistics are left
    untouched, and ONNX/TorchScript exports it as an ordinary op. Parameters and buffers are
    those of ``nn.BatchNorm2d``, so state dicts are interchangeable.
    """

    def __init__(self, num_features: int, *args, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.per_image = False

    def forward(self, x: Tensor) -> Tensor:
        if self.per_image:
            return per_image_norm(self, x)
        return super().forward(x)


def per_image_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    return F.instance_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
