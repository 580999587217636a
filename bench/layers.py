"""Layer suite: one convolution layer at a time, xnorconv against PyTorch fp32 and int8 (and OpenVINO's binary
convolution when the openvino package is installed), float tensor in and float tensor out."""
import math
import warnings

import torch
import torch.nn.functional as F

import xnorconv
from xnorconv._reference import reference_binary_conv2d

from .timing import interleaved, median_ms

# DarkNet53 at 128x128 input: (in_channels, out_channels, height=width, kernel, stride, padding).
DARKNET53_128 = [(64, 64, 64, 3, 1, 1), (128, 128, 32, 3, 1, 1), (256, 256, 16, 3, 1, 1), (512, 512, 8, 3, 1, 1),
                 (256, 512, 16, 3, 2, 1), (512, 256, 8, 1, 1, 0)]


def parse_shape(text):
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 6 or min(values[:4]) < 1 or values[4] < 1 or values[5] < 0:
        raise ValueError(f"--shape wants cin,cout,hw,k,stride,pad (positive ints), got {text!r}")
    return values


def _int8_conv(x, w, stride, pad):
    """PyTorch's int8 CPU convolution (x86 engine, channels_last), timed on quantized input and output: its best
    case, without the float<->int8 conversions that our float-in/float-out figure includes."""
    import torch.ao.nn.quantized as nnq
    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv = nnq.Conv2d(x.shape[1], w.shape[0], w.shape[2], stride, pad)
        scales = w.abs().amax(dim=(1, 2, 3)).clamp_min(1e-8) / 127
        qw = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        conv.set_weight_bias(qw, None)
        conv.scale, conv.zero_point = float(x.abs().max()) * w[0].numel() / 255 / 8, 128
        qx = torch.quantize_per_tensor(x, float(x.abs().max()) / 127, 128, torch.quint8)
        qx = qx.contiguous(memory_format=torch.channels_last)
    return lambda: conv(qx)


def layer_rows(shapes, batch, threads, reps, pad_value, backends, with_int8=True, with_openvino=True, progress=None):
    """Measures every shape; returns one dict per shape with medians (ms), ratios and rates."""
    from . import peers
    torch.set_num_threads(threads)
    peaks = {b: xnorconv._C.peak_binary_macs_per_second(b, 2_000_000) * threads for b in backends}
    openvino = peers.openvino_available() if with_openvino else False
    rows = []
    for shape in shapes:
        cin, cout, hw, k, s, p = shape
        x = torch.randn(batch, cin, hw, hw)
        w = torch.randn(cout, cin, k, k)
        packed = xnorconv.pack_weight(w)
        args = ([s, s], [p, p, p, p], [1, 1], 1, pad_value)

        def binary(x=x, packed=packed):
            return torch.ops.xnorconv.binary_conv2d_packed(x, packed.bits, packed.tap_sum, packed.in_channels,
                                                           None, None, *args)

        # Correctness before any timing: every backend, exactly, against the float64 reference.
        want = reference_binary_conv2d(x, w, None, (s, s), (p,) * 4, (1, 1), 1, None, pad_value)
        for b in backends:
            with xnorconv.use_backend(b):
                if not torch.equal(binary().double(), want):
                    raise AssertionError(f"xnorconv[{b}] differs from the reference on layer {shape}")
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fns = {"fp32 NCHW": lambda: F.conv2d(x, w, None, s, p), "fp32 NHWC": lambda: F.conv2d(x_cl, w, None, s, p)}
        if with_int8:
            fns["int8"] = _int8_conv(x, w, s, p)
        if openvino:
            ov = peers.openvino_binary_conv(x, w, s, p, threads)
            ov_want = reference_binary_conv2d(x, w, None, (s, s), (p,) * 4, (1, 1), 1, None, 1)
            if not torch.equal(ov().double(), ov_want):
                raise AssertionError(f"OpenVINO BinaryConvolution differs from the +1-padded reference on {shape}")
            fns["openvino binary"] = ov

        times = {}
        for b in backends:
            # use_backend is process-wide, so each backend is timed in its own interleaved run against fp32.
            with xnorconv.use_backend(b):
                t = interleaved({f"xnorconv {b}": binary, **fns}, reps)
            times[f"xnorconv {b}"] = t[f"xnorconv {b}"]
            for name in fns:
                times.setdefault(name, []).extend(t[name])
        ms = {name: median_ms(v) for name, v in times.items()}
        macs = batch * cout * ((hw + 2 * p - k) // s + 1) ** 2 * cin * k * k
        kernel = {b: xnorconv._C.conv_kernel_ms(b, x, w, [s, s], [p, p], pad_value, reps) for b in backends}
        rows.append({
            "shape": shape, "batch": batch, "macs": macs, "ms": ms,
            "kernel_ms": kernel,
            "kernel_fraction_of_peak": {b: macs / (kernel[b] * 1e-3) / peaks[b] for b in backends},
            "peak_gmacs": {b: peaks[b] / 1e9 for b in backends},
        })
        if progress:
            progress(shape)
    return rows


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))
