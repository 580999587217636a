"""xnorconv.MaxPool2d: nn.MaxPool2d through xnorconv.functional.max_pool2d."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import max_pool2d


# A plain function that torch.fx records as one call (the functional's argument checks would otherwise stop symbolic
# tracing, which xnorconv.freeze uses to find the layers it folds).
@torch.fx.wrap
def _max_pool(x, kernel_size, stride, padding, dilation, ceil_mode):
    if dilation not in (1, (1, 1)) or x.dim() != 4:
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    return max_pool2d(x, kernel_size, stride, padding, ceil_mode)


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d (same arguments, function and state; no return_indices) that pools a 4-D input with
    xnorconv.functional.max_pool2d: one pass of xnorconv's pool at inference, and channels_last in training (PyTorch's
    CPU max pooling of NCHW tensors is many times slower than of channels_last ones). After a network's float stem,
    freeze() fuses it into the stem as it fuses an nn.MaxPool2d (StemConv2d's pool)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.return_indices:
            raise ValueError("MaxPool2d: return_indices=True is not supported, got return_indices=True")

    def forward(self, x):
        return _max_pool(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
