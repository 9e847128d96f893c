"""Model classes of a user's own, registered as ``tiny-cnn``, ``token-bag`` and ``token-sequence``, and a loss of theirs, ``smoothed-ce``
(METALEARN_MODEL_MODULES=architecture_plugin, with this directory on PYTHONPATH): what
tests/test_custom_architecture.py trains, checkpoints and serves."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import metalearn


@metalearn.register_architecture("tiny-cnn")
class TinyCNN(nn.Module):
    """One conv block with torch's own BatchNorm (metalearn converts it), global pooling and a linear head."""

    def __init__(self, in_channels: int = 1, out_features: int = 5, width: int = 16, head_scale: float = 1.0):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(4), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, out_features)
        with torch.no_grad():
            self.head.weight.mul_(float(head_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@metalearn.register_architecture("token-bag")
class TokenBag(nn.Module):
    """Token ids (sent as numbers) -> the mean of their embeddings -> one value: ids past ``vocabulary`` make
    ``nn.Embedding`` raise IndexError, which the service answers as the request's fault."""

    def __init__(self, vocabulary: int = 10, width: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x.long()).mean(1))


class _Tokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()


class _Mean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


@metalearn.register_architecture("token-sequence")
class TokenSequence(nn.Sequential):
    """TokenBag as an nn.Sequential subclass: its forward is torch's own."""

    def __init__(self, vocabulary: int = 10, width: int = 4):
        super().__init__(_Tokens(), nn.Embedding(vocabulary, width), _Mean(), nn.Linear(width, 1))


@metalearn.register_loss("smoothed-ce")
def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, label_smoothing=0.2)
