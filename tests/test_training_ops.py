"""The training path's one-pass CPU ops (torch.ops.xnorconv.binary_signs, ste_input_grad, prelu_backward) against
the aten formulations they replace: every layout, odd shapes, batch 0, non-contiguous inputs, NaN and infinities,
each surrogate, with and without a threshold, a shared PReLU slope; opcheck; errors that name the argument; and
the same result on any number of threads.

Run from the repository root: python -m pytest tests/test_training_ops.py -q
"""
import math

import pytest
import torch
import torch.nn.functional as F

import xnorconv  # noqa: F401  (registers the ops)
import xnorconv._autograd as xa

SHAPES = [(3, 5, 7, 9), (2, 64, 16, 16), (1, 3, 1, 1), (0, 4, 3, 3), (2, 130, 5, 3), (1, 17, 129, 3), (2, 1, 4, 4)]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def with_special_values(shape, layout, seed):
    torch.manual_seed(seed)
    x = torch.randn(shape) * 1.5
    if x.numel() >= 8:
        x.view(-1)[:8] = torch.tensor([0.0, -0.0, math.nan, math.inf, -math.inf, 1.0, -1.0, 1e-40])
    return x.contiguous(memory_format=layout)


def signs_reference(x, threshold):
    t = threshold.view(1, -1, 1, 1) if threshold is not None else 0.0
    return torch.where(x >= t, 1.0, -1.0)


def expected_layout(x):
    return xnorconv._meta._channel_layout_like(x)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_threshold", [False, True])
def test_binary_signs(shape, layout, with_threshold):
    x = with_special_values(shape, layout, 1)
    threshold = torch.randn(shape[1]) * 0.5 if with_threshold else None
    out = torch.ops.xnorconv.binary_signs(x, threshold)
    assert torch.equal(out, signs_reference(x, threshold))
    assert out.is_contiguous(memory_format=expected_layout(x))


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ste", xa.STE_CHOICES)
@pytest.mark.parametrize("with_threshold", [False, True])
def test_ste_input_grad(shape, layout, ste, with_threshold):
    x = with_special_values(shape, layout, 2)
    g = torch.randn(shape)
    if g.numel() >= 12:
        g.view(-1)[8:12] = torch.tensor([math.nan, math.inf, 0.0, -math.inf])
    g = g.contiguous(memory_format=layout)
    threshold = torch.randn(shape[1]) * 0.3 if with_threshold else None
    grad_x, grad_t = torch.ops.xnorconv.ste_input_grad(g, x, threshold, ste)
    expected = xa._ste_input_grad_aten(g, x, threshold, ste)
    torch.testing.assert_close(grad_x, expected, rtol=0, atol=0, equal_nan=True)
    assert grad_x.is_contiguous(memory_format=expected_layout(x))
    if with_threshold:
        torch.testing.assert_close(grad_t, expected.double().sum(dim=(0, 2, 3)).neg().float(), rtol=1e-5, atol=1e-5,
                                   equal_nan=True)
    else:
        assert grad_t.shape == (0,)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ste", xa.STE_CHOICES)
def test_ste_input_grad_converts_a_channels_last_gradient(shape, ste):
    """An NCHW input with a channels_last gradient (a convolution's, computed on channels_last operands): the pass
    reads the gradient across layouts (4 x 4 tiles, then the leftover channels and pixels one by one)."""
    x = with_special_values(shape, torch.contiguous_format, 5)
    g = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    threshold = torch.randn(shape[1]) * 0.3
    grad_x, grad_t = torch.ops.xnorconv.ste_input_grad(g, x, threshold, ste)
    expected = xa._ste_input_grad_aten(g.contiguous(), x, threshold, ste)
    assert grad_x.is_contiguous()
    torch.testing.assert_close(grad_x, expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad_t, expected.double().sum(dim=(0, 2, 3)).neg().float(), rtol=1e-5, atol=1e-5,
                               equal_nan=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("from_layout, to_layout", [("nchw", "nhwc"), ("nhwc", "nchw"), ("nchw", "nchw"),
                                                    ("nhwc", "nhwc")])
def test_binary_signs_memory_format(shape, from_layout, to_layout):
    x = with_special_values(shape, LAYOUTS[from_layout], 6)
    threshold = torch.randn(shape[1]) * 0.5
    out = torch.ops.xnorconv.binary_signs(x, threshold, LAYOUTS[to_layout])
    assert out.is_contiguous(memory_format=LAYOUTS[to_layout])
    assert torch.equal(out, signs_reference(x, threshold))
    # The composition other devices run gives the same.
    assert torch.equal(xa._signs_aten(x, threshold, LAYOUTS[to_layout]), out)


def test_prelu_composition_of_other_devices():
    """_PReLUFunction's aten backward (devices without the op; float64 takes it on the CPU) against F.prelu."""
    z = with_special_values((3, 6, 5, 4), torch.contiguous_format, 7).double()
    g, w = torch.randn(3, 6, 5, 4).double(), (torch.rand(6) - 0.25).double()
    z1, w1 = z.clone().requires_grad_(), w.clone().requires_grad_()
    xnorconv.functional.prelu(z1, w1).backward(g)
    z2, w2 = z.clone().requires_grad_(), w.clone().requires_grad_()
    F.prelu(z2, w2).backward(g)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-12, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("shape", SHAPES + [(4, 6), (2, 5, 33)])
@pytest.mark.parametrize("shared", [False, True])
def test_prelu_backward(shape, layout, shared):
    z = with_special_values(shape, layout if len(shape) == 4 else torch.contiguous_format, 3)
    g = torch.randn(shape)
    w = torch.rand(1 if shared else shape[1]) - 0.25
    z_ref, w_ref = z.clone().requires_grad_(), w.clone().requires_grad_()
    F.prelu(z_ref, w_ref).backward(g)
    grad_z, grad_w = torch.ops.xnorconv.prelu_backward(g, z, w)
    torch.testing.assert_close(grad_z, z_ref.grad, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(grad_w, w_ref.grad, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_non_contiguous_inputs():
    base = torch.randn(2, 12, 9, 10)
    x, g, t = base[:, ::2], torch.randn(2, 12, 9, 10)[:, 1::2], torch.randn(12)[::2]
    assert torch.equal(torch.ops.xnorconv.binary_signs(x, t), signs_reference(x, t))
    grad_x, grad_t = torch.ops.xnorconv.ste_input_grad(g, x, t, "approx")
    expected = xa._ste_input_grad_aten(g, x, t, "approx")
    assert torch.equal(grad_x, expected)
    torch.testing.assert_close(grad_t, expected.sum(dim=(0, 2, 3)).neg())
    w = torch.rand(12)[::2]
    grad_z, _ = torch.ops.xnorconv.prelu_backward(g, x, w)
    assert torch.equal(grad_z, torch.where(x > 0, g, w.view(1, -1, 1, 1) * g))


def test_same_result_on_any_number_of_threads():
    """The sums are made per fixed block of the tensor and added in block order, whatever the threads."""
    x = with_special_values((4, 48, 40, 40), torch.contiguous_format, 4).nan_to_num()
    g, t, w = torch.randn(4, 48, 40, 40), torch.randn(48), torch.rand(48)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for layout in LAYOUTS.values():
                xl, gl = x.contiguous(memory_format=layout), g.contiguous(memory_format=layout)
                results.append((threads, layout, torch.ops.xnorconv.ste_input_grad(gl, xl, t, "clipped")[1],
                                torch.ops.xnorconv.prelu_backward(gl, xl, w)[1]))
    finally:
        torch.set_num_threads(before)
    for threads, layout, grad_t, grad_w in results:
        first = next(r for r in results if r[1] == layout)
        assert torch.equal(grad_t, first[2]) and torch.equal(grad_w, first[3]), (threads, layout)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_opcheck(layout):
    x = torch.randn(2, 6, 5, 4).contiguous(memory_format=layout)
    g = torch.randn(2, 6, 5, 4).contiguous(memory_format=layout)
    t, w = torch.randn(6), torch.rand(6)
    torch.library.opcheck(torch.ops.xnorconv.binary_signs.default, (x, t))
    torch.library.opcheck(torch.ops.xnorconv.binary_signs.default, (x, None))
    torch.library.opcheck(torch.ops.xnorconv.binary_signs.default, (x, t, torch.channels_last))
    torch.library.opcheck(torch.ops.xnorconv.binary_signs.default, (x, t, torch.contiguous_format))
    for ste in xa.STE_CHOICES:
        torch.library.opcheck(torch.ops.xnorconv.ste_input_grad.default, (g, x, t, ste))
    torch.library.opcheck(torch.ops.xnorconv.ste_input_grad.default, (g, x, None, "clipped"))
    torch.library.opcheck(torch.ops.xnorconv.ste_input_grad.default,
                          (g.contiguous(memory_format=torch.channels_last), x.contiguous(), t, "approx"))
    torch.library.opcheck(torch.ops.xnorconv.prelu_backward.default, (g, x, w))
    torch.library.opcheck(torch.ops.xnorconv.prelu_backward.default, (g, x, w[:1]))


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.xnorconv.binary_signs(torch.randn(4), None),
     r"binary_signs: input must have a batch and a channel dimension .* got a 1-D tensor"),
    (lambda: torch.ops.xnorconv.binary_signs(torch.randn(1, 2, 3, 3).double(), None),
     r"binary_signs: input must be float32, got Double"),
    (lambda: torch.ops.xnorconv.binary_signs(torch.randn(1, 2, 3, 3), torch.zeros(3)),
     r"binary_signs: threshold must have shape \(2,\) .* got \[3\]"),
    (lambda: torch.ops.xnorconv.binary_signs(torch.randn(2, 3), None, torch.channels_last),
     r"binary_signs: memory_format must be torch.contiguous_format, or torch.channels_last for a 4-D input, got "),
    (lambda: torch.ops.xnorconv.ste_input_grad(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), None, "tanh"),
     r"ste_input_grad: ste must be 'clipped', 'identity' or 'approx', got 'tanh'"),
    (lambda: torch.ops.xnorconv.ste_input_grad(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 3), None, "clipped"),
     r"ste_input_grad: grad must have the input's shape \[1, 2, 3, 3\], got \[1, 2, 3, 4\]"),
    (lambda: torch.ops.xnorconv.ste_input_grad(torch.randn(1, 2, 3, 3).half(), torch.randn(1, 2, 3, 3), None,
                                               "clipped"),
     r"ste_input_grad: grad must be float32, got Half"),
    (lambda: torch.ops.xnorconv.prelu_backward(torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3), torch.rand(3)),
     r"prelu_backward: weight must have shape \(1,\) or \(4,\) .* got \[3\]"),
    (lambda: torch.ops.xnorconv.prelu_backward(torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3),
                                               torch.rand(4).double()),
     r"prelu_backward: weight must be float32, got Double"),
])
def test_errors_name_the_argument(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()
