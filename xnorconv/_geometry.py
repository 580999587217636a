"""The nn.Conv2d geometry of xnorconv's inference layers (FrozenBinaryConv2d, Int8Conv2d), which hold packed or
quantized weights and so are not nn.Conv2d subclasses: the same attributes, normalised by nn.Conv2d itself, and the
same text in their repr."""
import torch.nn as nn

_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
          "_reversed_padding_repeated_twice")


def set_conv2d_geometry(module: nn.Module, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                        padding_mode) -> None:
    # nn.Conv2d's own argument handling and messages; on meta it allocates nothing.
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, False, padding_mode,
                     device="meta")
    for attr in _ATTRS:
        setattr(module, attr, getattr(conv, attr))


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
