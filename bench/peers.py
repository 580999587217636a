"""Other implementations measured beside xnorconv, when their packages are installed.

OpenVINO (pip ``openvino``) is the fastest binary convolution on x86 CPUs we know of. Its binary networks are an
ordinary float graph in which a ``FakeQuantize`` with ``levels=2`` binarizes the activations and a
``BinaryConvolution`` (opset1, mode ``xnor-popcount``) consumes them with ``u1`` weights; the CPU plugin fuses the
FakeQuantize into a bit-packing pass and runs its JIT binary kernel. We build exactly that graph for one layer.

How it binarizes, and how we make it equal to ``xnorconv.testing.reference_conv2d`` (``sign(0) = +1``, pad taps = +1):

* A FakeQuantize with ``levels=2``, ``input_low == input_high == t`` and outputs 0/1 becomes the CPU plugin's
  "binarization": bit = ``x > t`` (a strict compare; with output_high 0 the bit is inverted). With ``t = 0`` a zero
  input would give bit 0 = -1, unlike our ``sign``. For float32, ``x >= 0`` is the same set as ``x > t`` for ``t`` the
  negative float closest to zero (``-2**-149``, a denormal), so that is our threshold: +0.0, -0.0 and every
  positive number give +1, every negative number (even ``-2**-149``) gives -1. This relies on the CPU not flushing
  denormals, which is OpenVINO's default. (With openvino 2026.4, setting ``CPU_DENORMALS_OPTIMIZATION`` explicitly,
  to either value, made zero inputs come out -1 in our test, so we leave it unset.) The benchmark asserts equality
  before timing (layers.py) and the tests pin the zero cases.
* ``mode='xnor-popcount'``: bit 0 means -1, bit 1 means +1; output = 2 * popcount(xnor) - taps, float32.
* ``pad_value=1.0``: padded taps are bit 1, i.e. +1 (``0.0`` would exclude them; anything else is -1).
* ``u1`` weights: the CPU plugin reads the raw bytes least significant bit first (element ``8*j + i`` of the
  flattened (O, C, kh, kw) tensor is bit ``i`` of byte ``j``), i.e. ``numpy.packbits(bits, bitorder='little')``.
  Note that ``ov.op.Constant(...).get_vector()`` decodes the same bytes most significant bit first, so it does not
  round-trip; the plugin's order is what counts and the correctness check pins it.

Speed settings, measured on this machine: ``ENABLE_CPU_PINNING=False`` (with pinning, the first DarkNet layer took
~3.8 ms instead of ~1.3 ms on a shared 2-core machine), ``INFERENCE_NUM_THREADS=threads``, one stream, latency hint,
f32 inference precision (a bf16 output would round the integer counts). The input tensor is bound once with shared
memory (zero copy) and the output is returned as a zero-copy torch view of OpenVINO's output buffer (overwritten by
the next call), which is OpenVINO's best case.
"""
import importlib.util

import numpy as np
import torch

_core = None


def openvino_available():
    return importlib.util.find_spec("openvino") is not None


def openvino_version():
    import openvino
    return openvino.__version__ if hasattr(openvino, "__version__") else openvino.get_version()


def _ov_core():
    global _core
    if _core is None:
        import openvino
        _core = openvino.Core()
    return _core


# The negative float32 closest to zero: `x > _THRESHOLD` is exactly `x >= 0` (see the module docstring).
_THRESHOLD = -np.nextafter(np.float32(0), np.float32(1))


def pack_u1_weights(weight):
    """(O, C, kh, kw) float weights -> bytes in the order OpenVINO's CPU plugin reads u1 (LSB first); 1 = sign +1."""
    bits = (weight.detach().cpu().reshape(-1) >= 0).numpy().astype(np.uint8)
    return np.packbits(bits, bitorder="little")


def _binary_conv_model(shape, weight, stride, pad):
    import openvino as ov
    import openvino.opset1 as ops
    param = ops.parameter(list(shape), np.float32, name="x")
    one = lambda v: np.full((1, 1, 1, 1), v, np.float32)  # noqa: E731
    binarized = ops.fake_quantize(param, one(_THRESHOLD), one(_THRESHOLD), one(0), one(1), 2)
    w = ov.Tensor(ov.Type.u1, ov.Shape(list(weight.shape)))
    packed = pack_u1_weights(weight)
    if w.data.size != packed.size:
        raise AssertionError(f"u1 tensor holds {w.data.size} bytes, packed weights {packed.size}")
    np.copyto(w.data, packed)
    conv = ops.binary_convolution(binarized, ov.op.Constant(w), [stride, stride], [pad, pad], [pad, pad], [1, 1],
                                  "xnor-popcount", 1.0, name="binary_conv")
    return ov.Model([conv], [param], "xnorconv_bench_binary_conv")


def _compile(model, threads, profile=False):
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}
    if profile:
        config["PERF_COUNT"] = True
    return _ov_core().compile_model(model, "CPU", config)


def openvino_binary_conv(x, w, stride, pad, threads):
    """A callable computing OpenVINO's BinaryConvolution of `x` (N, C, H, W float32, bound now) with sign(`w`),
    +1 padding, float32 in and float32 NCHW out (what `reference_conv2d(..., pad_value=1)` gives)."""
    import openvino as ov
    x = x.detach().contiguous()
    request = _compile(_binary_conv_model(x.shape, w, stride, pad), threads).create_infer_request()
    request.set_input_tensor(ov.Tensor(x.numpy(), shared_memory=True))

    def run():
        request.infer()
        return torch.from_numpy(request.get_output_tensor().data)

    run.x = x  # keep the bound input alive as long as the callable
    return run


class OpenVinoKernelTimer:
    """Each call returns the seconds OpenVINO's own profiler gives the BinaryConvolution node alone (input already
    binarized, before the output layout reorder): OpenVINO's "kernel alone" figure, warm cache. Resolution is
    1 microsecond."""

    def __init__(self, x, w, stride, pad, threads):
        import openvino as ov
        self.x = x.detach().contiguous()
        self.request = _compile(_binary_conv_model(self.x.shape, w, stride, pad), threads,
                                profile=True).create_infer_request()
        self.request.set_input_tensor(ov.Tensor(self.x.numpy(), shared_memory=True))
        self.request.infer()
        kinds = {p.node_type: p.exec_type for p in self.request.get_profiling_info()}
        if "BinaryConvolution" not in kinds:
            raise RuntimeError(f"OpenVINO ran no BinaryConvolution node (nodes: {kinds})")
        self.exec_type = kinds["BinaryConvolution"]  # e.g. jit_avx512_u1

    def __call__(self):
        # Two runs, the second one read: warm caches (weights and input just touched), the same condition as
        # xnorconv's kernel hook, which packs its operands right before its timed pass. Interleaved with other
        # work, a single run reads the weights from a cold cache (2x slower on the stride-2 DarkNet layer here).
        self.request.infer()
        self.request.infer()
        return sum(p.real_time.total_seconds() for p in self.request.get_profiling_info()
                   if p.node_type == "BinaryConvolution")
