"""Where each fused shortcut of a frozen BinaryDNet53 lies from its output modulo 4 KiB, in a forward pass under
PyTorch's allocator (README: within about 64 bytes, residual loads wait on unrelated output stores).
Usage: PYTHONPATH=. python docs/perf/output-steps/shortcut_offsets.py"""
import torch

import models
import xnorconv
from bench.model_suite import module_calls

torch.set_num_threads(1)
torch.manual_seed(0)
model = xnorconv.freeze(models.create("binary_dnet53", 2).eval())
x = torch.randn(1, 3, 128, 128)
with torch.no_grad():
    for _ in range(5):  # the allocator's steady state, as in a serving loop
        model(x)
for name, _, args, out in module_calls(model, x):
    input_shortcut = len(args) > 3 and args[3] is True
    shortcut = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else args[0] if input_shortcut else None
    if shortcut is None:
        continue
    offset = (shortcut.data_ptr() - out.data_ptr()) % 4096
    offset = offset if offset < 2048 else offset - 4096
    print(f"{name:35s} {tuple(args[0].shape)} -> {tuple(out.shape)}: shortcut {offset:+5d} B from the output")
