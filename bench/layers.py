"""Layer suite: one convolution layer at a time, xnorconv against PyTorch fp32 and int8 (and OpenVINO's binary
convolution when the openvino package is installed), float tensor in and float tensor out."""
import math
import warnings

import torch
import torch.nn.functional as F

import xnorconv
from xnorconv import profiling
from xnorconv.testing import reference_conv2d

from .timing import SelfTimed, interleaved, median_ms

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


# Iterations of one peak-probe call: ~1.5 ms per repeat on AVX-512, short enough to land between other processes'
# time slices on a shared machine (long probes get preempted and under-read the peak).
PROBE_ITERATIONS = 50_000


def layer_rows(shapes, batch, threads, reps, pad_value, backends, with_int8=True, with_openvino=True, progress=None):
    """Measures every shape; returns one dict per shape with medians (ms), ratios and rates.

    Besides the float-in/float-out callables, every interleaved round also runs, per backend, the convolution pass
    alone on pre-packed input and the peak probe (`xnorconv.profiling`), so the probe sees the same machine as the
    kernel. The fraction of peak is best kernel rate over best probe rate
    over the whole run (both are estimates of the uncontended rate; a probe taken once can land in contention and
    make the fraction exceed 100%)."""
    from . import peers
    torch.set_num_threads(threads)
    openvino = peers.openvino_available() if with_openvino else False
    probe_samples = {b: [] for b in backends}
    rows = []
    for shape in shapes:
        cin, cout, hw, k, s, p = shape
        x = torch.randn(batch, cin, hw, hw)
        w = torch.randn(cout, cin, k, k)
        packed = xnorconv.pack_weight(w)

        def binary(x=x, packed=packed, s=s, p=p):  # the public API with weights packed once, as a user calls it
            return xnorconv.binary_conv2d_packed(x, packed, stride=s, padding=p, pad_value=pad_value)

        # Correctness before any timing: every backend, exactly, against the float64 reference.
        want = reference_conv2d(x, w, None, (s, s), (p,) * 4, (1, 1), 1, None, pad_value)
        for b in backends:
            with xnorconv.use_backend(b):
                if not torch.equal(binary().double(), want):
                    raise AssertionError(f"xnorconv[{b}] differs from the reference on layer {shape}")
        x_cl = x.contiguous(memory_format=torch.channels_last)
        fns = {"fp32 NCHW": lambda: F.conv2d(x, w, None, s, p), "fp32 NHWC": lambda: F.conv2d(x_cl, w, None, s, p)}
        if with_int8:
            fns["int8"] = _int8_conv(x, w, s, p)
        notes = []
        if openvino:
            ov = peers.openvino_binary_conv(x, w, s, p, threads)
            ov_want = reference_conv2d(x, w, None, (s, s), (p,) * 4, (1, 1), 1, None, 1)
            ov_got = ov().double()
            if torch.equal(ov_got, ov_want):
                fns["openvino binary"] = ov
                fns["openvino kernel"] = SelfTimed(peers.OpenVinoKernelTimer(x, w, s, p, threads))
            elif cin % 8:
                # Measured with openvino 2026.4: wrong counts whenever in_channels is not a multiple of 8. A wrong
                # result is not timed; the row says why it has no OpenVINO figure.
                notes.append(f"OpenVINO skipped: wrong result (max error {(ov_got - ov_want).abs().max():.0f}) "
                             f"with in_channels={cin} not a multiple of 8")
            else:
                raise AssertionError(f"OpenVINO BinaryConvolution differs from the +1-padded reference on {shape}")

        times, kernel_samples = {}, {}
        for b in backends:
            # The profiling hooks take the backend by name and leave the override below as it was.
            kernel = SelfTimed(lambda b=b: profiling.conv_kernel_ms(b, x, w, s, p, pad_value, 1) * 1e-3)
            probe = SelfTimed(lambda b=b: profiling.peak_binary_macs_per_second(b, PROBE_ITERATIONS))
            # use_backend is process-wide, so each backend is timed in its own interleaved run against the others.
            with xnorconv.use_backend(b):
                t = interleaved({f"xnorconv {b}": binary, "kernel": kernel, "probe": probe, **fns}, reps)
                if xnorconv.current_backend(cin, k) != b:
                    raise AssertionError(f"backend override lost while timing {b}: "
                                         f"{xnorconv.current_backend(cin, k)} selected")
            times[f"xnorconv {b}"] = t.pop(f"xnorconv {b}")
            kernel_samples[b] = t.pop("kernel")
            probe_samples[b].extend(t.pop("probe"))
            for name in fns:
                times.setdefault(name, []).extend(t[name])
        # What a user gets without use_backend: the selector's choice for this layer (the same timings).
        auto = xnorconv.current_backend(cin, k, s)
        if len(backends) > 1 and auto in backends:
            times["xnorconv auto"] = times[f"xnorconv {auto}"]
            kernel_samples["auto"] = kernel_samples[auto]
        if "openvino kernel" in times:  # a kernel-alone figure: reported beside xnorconv's, not as float in/out
            kernel_samples["openvino"] = times.pop("openvino kernel")
        macs = batch * cout * ((hw + 2 * p - k) // s + 1) ** 2 * cin * k * k
        rows.append({
            "shape": list(shape), "batch": batch, "threads": threads, "macs": macs, "auto_backend": auto,
            "ms": {name: median_ms(v) for name, v in times.items()},
            "kernel_ms": {b: median_ms(v) for b, v in kernel_samples.items()},
            "kernel_best_ms": {b: min(v) * 1e3 for b, v in kernel_samples.items()},
            "notes": notes,
        })
        if progress:
            progress(shape)
    # One peak per backend for the whole run: the best probe reading, times the threads (the probe is one thread).
    peaks = {b: max(v) * threads for b, v in probe_samples.items()}
    for r in rows:
        r["peak_gmacs"] = {b: peaks[b] / 1e9 for b in backends}
        r["kernel_fraction_of_peak"] = {b: r["macs"] / (r["kernel_best_ms"][b] * 1e-3) / peaks[b] for b in backends}
        if "auto" in r["kernel_best_ms"]:
            r["peak_gmacs"]["auto"] = r["peak_gmacs"][r["auto_backend"]]
            r["kernel_fraction_of_peak"]["auto"] = r["kernel_fraction_of_peak"][r["auto_backend"]]
        if "openvino" in r["kernel_best_ms"] and r["kernel_best_ms"]["openvino"] > 0:
            # OpenVINO's binary kernel is an AVX-512 popcount loop: measured against that family's probe.
            r["openvino_kernel_fraction_of_peak"] = (r["macs"] / (r["kernel_best_ms"]["openvino"] * 1e-3)
                                                     / peaks.get("avx512", peaks[backends[0]]))
        r["speedup_vs_fp32"] = {b: r["ms"]["fp32 NCHW"] / r["ms"][f"xnorconv {b}"]
                                for b in backends + (["auto"] if "xnorconv auto" in r["ms"] else [])}
        r["gops"] = {name: 2 * r["macs"] / (ms * 1e-3) / 1e9 for name, ms in r["ms"].items() if ms > 0}
    return rows


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))
