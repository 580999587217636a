"""xnorconv: bit-packed XNOR-popcount binary convolution for PyTorch."""
__version__ = "0.1.0"

import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (registers torch.ops.xnorconv.*)
from . import _meta  # noqa: F401  (fake kernels for torch.compile / torch.export)
from . import functional
from ._backend import backends, build_info, current_backend, use_backend
from .functional import PackedWeight, binary_conv2d, binary_conv2d_packed, pack_weight
from . import nn
from .nn import BinaryConv2d, FrozenBinaryConv2d, binarize, freeze, frozen_memory_format
from . import profiling, testing
from ._first_layer import Int8Conv2d, StemConv2d
from ._pooling import MaxPool2d
from ._transforms import fold_batchnorm

__all__ = [
    "BinaryConv2d", "FrozenBinaryConv2d", "Int8Conv2d", "MaxPool2d", "PackedWeight", "backends", "binarize", "binary_conv2d",
    "binary_conv2d_packed", "build_info", "current_backend", "fold_batchnorm", "freeze", "frozen_memory_format",
    "functional", "nn",
    "pack_weight", "profiling", "StemConv2d", "testing", "use_backend",
]
