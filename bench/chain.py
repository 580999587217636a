"""Two binary layers in a row (conv -> BN -> binary conv -> BN), frozen with and without the sign hand-over
(xnorconv.freeze(chain_signs=...)): what passing signs instead of floats between binary layers gains."""
import torch
from torch import nn

import xnorconv

from .timing import interleaved, median_ms

# (channels, height=width): DarkNet53-at-128px widths.
DEFAULT_SHAPES = [(64, 64), (128, 32), (256, 16), (512, 8)]


class TwoBinaryLayers(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = xnorconv.BinaryConv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = xnorconv.BinaryConv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))


def chain_rows(shapes, threads, reps):
    torch.set_num_threads(threads)
    rows = []
    for channels, hw in shapes:
        model = TwoBinaryLayers(channels)
        with torch.no_grad():
            for bn in (model.bn1, model.bn2):
                bn.running_mean.uniform_(-2, 2)
                bn.running_var.uniform_(0.5, 2)
        model.eval()
        floats = xnorconv.freeze(model, chain_signs=False)
        signs = xnorconv.freeze(model, chain_signs=True)
        x = torch.randn(1, channels, hw, hw)
        with torch.no_grad():
            if signs.conv1(x).dtype != torch.bool:
                raise AssertionError(f"freeze(chain_signs=True) did not chain the layers at {channels}x{hw}")
            if not torch.allclose(signs(x), floats(x), rtol=1e-5, atol=1e-4):
                raise AssertionError(f"sign hand-over changes the result at {channels}x{hw}")
            times = interleaved({"float hand-over": lambda: floats(x), "sign hand-over": lambda: signs(x)}, reps)
        ms = {name: median_ms(v) for name, v in times.items()}
        rows.append({"channels": channels, "hw": hw, "ms": ms,
                     "gain": ms["float hand-over"] / ms["sign hand-over"]})
    return rows
