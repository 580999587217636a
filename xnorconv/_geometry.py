"""The nn.Conv2d geometry of xnorconv's inference layers (FrozenBinaryConv2d, Int8Conv2d), which hold packed or
quantized weights and so are not nn.Conv2d subclasses: the same text in their repr."""
import torch.nn as nn


def conv2d_geometry_repr(module: nn.Module) -> str:
    """What nn.Conv2d.extra_repr shows for the same geometry and bias; a layer appends its own options."""
    s = f"{module.in_channels}, {module.out_channels}, kernel_size={module.kernel_size}, stride={module.stride}"
    if module.padding != (0, 0):
        s += f", padding={module.padding}"
    if module.dilation != (1, 1):
        s += f", dilation={module.dilation}"
    if module.groups != 1:
        s += f", groups={module.groups}"
    if module.bias is None:
        s += ", bias=False"
    if module.padding_mode != "zeros":
        s += f", padding_mode={module.padding_mode}"
    return s
