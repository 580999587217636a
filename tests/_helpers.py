"""Helpers that several test files share. pytest puts tests/ on sys.path (conftest.py lives there and tests/ has no
__init__.py), so a test file imports this as `from _helpers import ...`; conftest.py itself is not for importing."""
import torch
from torch import nn


def randomize_batchnorm(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so BN folding is really exercised."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
