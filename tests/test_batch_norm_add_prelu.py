"""xnorconv.functional.batch_norm_add_prelu (prelu(batch_norm(x) + residual), the end of a Bi-Real / ReActNet /
BinaryDNet53 unit in training) and its CPU ops (torch.ops.xnorconv.channel_moments, batch_norm_add_prelu,
batch_norm_add_prelu_backward) against the composition of F.batch_norm, add and F.prelu evaluated in float64:
values, every gradient, the running statistics, batch and running statistics (training, and fine-tuning with
frozen statistics), both layouts, odd shapes, a shared slope, no residual, second
derivatives, the fallbacks, NaN, a mean far from zero, the same result on any number of threads, opcheck and errors
that name the argument. BinaryDNet53's units use it in training.

Run from the repository root: python -m pytest tests/test_batch_norm_add_prelu.py -q
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import xnorconv
from models.binary_dnet53 import BinaryConvUnit

SHAPES = [(3, 5, 7, 9), (2, 64, 16, 16), (4, 3, 1, 1), (2, 130, 5, 3), (1, 17, 129, 131), (2, 1, 4, 4), (4, 6),
          (2, 5, 33)]
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def composition(x, residual, running_mean, running_var, weight, bias, slope, training, momentum, eps):
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return F.prelu(y if residual is None else y + residual, slope)


def operands(shape, layout, seed, shared=False, residual=True, offset=0.0):
    torch.manual_seed(seed)
    c = shape[1]
    layout = layout if len(shape) == 4 else torch.contiguous_format
    x = (torch.randn(shape) * 2.0 + offset).contiguous(memory_format=layout)
    r = torch.randn(shape).contiguous(memory_format=layout) if residual else None
    return dict(x=x, residual=r, running_mean=torch.randn(c), running_var=torch.rand(c) + 0.5,
                weight=torch.rand(c) + 0.5, bias=torch.randn(c), slope=torch.rand(1 if shared else c) - 0.3)


def run(fn, ops, g, dtype=torch.float32, training=True, momentum=0.1, eps=1e-5, create_graph=False):
    """fn's output, the gradients of x, residual, weight, bias and slope for the output gradient g, and the updated
    running statistics, in `dtype`."""
    leaves = {k: v.to(dtype).clone() for k, v in ops.items() if v is not None}
    for k in ("x", "residual", "weight", "bias", "slope"):
        if k in leaves:
            leaves[k].requires_grad_()
    out = fn(leaves["x"], leaves.get("residual"), leaves["running_mean"], leaves["running_var"], leaves["weight"],
             leaves["bias"], leaves["slope"], training, momentum, eps)
    wanted = [leaves[k] for k in ("x", "residual", "weight", "bias", "slope") if k in leaves]
    grads = torch.autograd.grad(out, wanted, g.to(dtype), create_graph=create_graph)
    return out, grads, leaves["running_mean"], leaves["running_var"]


def assert_close_to(got, want, what, atol=1e-5):
    """got (float32) against want (float64): to float32 rounding of the quantities involved (atol: relative to the
    largest magnitude of want)."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol * max(1.0, scale), equal_nan=True, msg=what)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
def test_matches_the_composition(shape, layout, shared, residual, training):
    ops = operands(shape, layout, 1, shared, residual)
    g = torch.randn(shape)
    out, grads, rm, rv = run(xnorconv.functional.batch_norm_add_prelu, ops, g, training=training)
    ref_out, ref_grads, ref_rm, ref_rv = run(composition, ops, g, torch.float64, training=training)
    assert type(out.grad_fn).__name__ == "_BatchNormAddPReLUFunctionBackward"
    assert out.dtype == torch.float32
    if len(shape) == 4 and layout == torch.channels_last and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to(out, ref_out, "output")
    for name, a, b in zip(("x", "residual", "weight", "bias", "slope") if residual else
                          ("x", "weight", "bias", "slope"), grads, ref_grads):
        assert_close_to(a, b, f"gradient of {name}")
    assert_close_to(rm, ref_rm, "running_mean")
    assert_close_to(rv, ref_rv, "running_var")


def test_a_mean_far_from_zero_keeps_the_variance():
    """Per-block means merged pairwise: no cancellation of a large mean against a small spread."""
    ops = operands((4, 8, 40, 40), torch.contiguous_format, 2, offset=3000.0)
    mean, var = torch.ops.xnorconv.channel_moments(ops["x"])
    ref_var, ref_mean = torch.var_mean(ops["x"].double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=0)
    g = torch.randn(4, 8, 40, 40)
    out, grads, _, _ = run(xnorconv.functional.batch_norm_add_prelu, ops, g)
    ref_out, ref_grads, _, _ = run(composition, ops, g, torch.float64)
    # The float32 mean itself is off by up to half a unit in the last place of 3000 (1.2e-4), as in PyTorch's BN.
    assert_close_to(out, ref_out, "output", atol=1e-4)
    assert_close_to(grads[0], ref_grads[0], "gradient of x", atol=1e-4)


def test_nan_and_infinity_reach_the_same_places():
    ops = operands((2, 6, 5, 5), torch.contiguous_format, 3)
    ops["x"][0, 1, 2, 2] = math.nan
    ops["x"][1, 3, 0, 0] = math.inf
    ops["x"][0, 5, 0, 0] = -math.inf  # in the first block of its channel
    ops["residual"][0, 4, 1, 1] = -math.inf
    g = torch.randn(2, 6, 5, 5)
    out, grads, rm, rv = run(xnorconv.functional.batch_norm_add_prelu, ops, g)
    ref_out, ref_grads, ref_rm, ref_rv = run(composition, ops, g)
    for a, b in [(out, ref_out), (grads[0], ref_grads[0]), (grads[1], ref_grads[1]), (rm, ref_rm), (rv, ref_rv)]:
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.isinf(), b.isinf())


@pytest.mark.parametrize("training", [True, False], ids=["batch_stats", "running_stats"])
def test_second_derivatives(training):
    """create_graph=True: the backward is differentiated through the composition."""
    ops = operands((2, 5, 4, 4), torch.contiguous_format, 4)
    g, v = torch.randn(2, 5, 4, 4), torch.randn(2, 5, 4, 4)
    found = []
    for fn, dtype in ((xnorconv.functional.batch_norm_add_prelu, torch.float32), (composition, torch.float64)):
        t = {k: val.to(dtype).clone() for k, val in ops.items()}
        leaves = [t[k].requires_grad_() for k in ("x", "residual", "weight", "bias", "slope")]
        out = fn(t["x"], t["residual"], t["running_mean"], t["running_var"], t["weight"], t["bias"], t["slope"],
                 training, 0.1, 1e-5)
        grad_x, = torch.autograd.grad(out, [t["x"]], g.to(dtype), create_graph=True)
        second = torch.autograd.grad((grad_x * v.to(dtype)).sum(), leaves, allow_unused=True)
        found.append([torch.zeros_like(leaf) if d is None else d for leaf, d in zip(leaves, second)])
    for name, a, b in zip(("x", "residual", "weight", "bias", "slope"), *found):
        assert_close_to(a, b, f"second derivative through {name}")


def test_fallbacks_are_the_composition():
    """Inference (running statistics, no gradients recorded), float64 (with batch or running statistics), BatchNorm
    without affine parameters and a residual of another shape (broadcast) run the composition."""
    ops = operands((3, 4, 6, 6), torch.contiguous_format, 5)
    g = torch.randn(3, 4, 6, 6)
    out, grads, rm, rv = run(xnorconv.functional.batch_norm_add_prelu, ops, g, torch.float64)
    ref_out, ref_grads, ref_rm, ref_rv = run(composition, ops, g, torch.float64)
    assert torch.equal(out, ref_out) and torch.equal(rm, ref_rm) and torch.equal(rv, ref_rv)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
    x = ops["x"]
    args = (ops["residual"], ops["running_mean"], ops["running_var"], ops["weight"], ops["bias"], ops["slope"], False)
    with torch.no_grad():
        assert torch.equal(xnorconv.functional.batch_norm_add_prelu(x, *args), composition(x, *args, 0.1, 1e-5))
    x64 = x.double().requires_grad_()
    args = tuple(ops[k].double() for k in ("residual", "running_mean", "running_var", "weight", "bias", "slope"))
    args += (False,)
    y = xnorconv.functional.batch_norm_add_prelu(x64, *args)
    assert y.grad_fn is not None and type(y.grad_fn).__name__ != "_BatchNormAddPReLUFunctionBackward"
    assert torch.equal(y, composition(x64, *args, 0.1, 1e-5))
    # A residual the composition broadcasts ((C, 1, 1)) takes the composition too.
    for residual in (ops["residual"][0, :, :1, :1],):
        y = xnorconv.functional.batch_norm_add_prelu(x, residual, None, None, ops["weight"], ops["bias"],
                                                     ops["slope"], True)
        assert torch.equal(y, composition(x, residual, None, None, ops["weight"], ops["bias"], ops["slope"], True,
                                          0.1, 1e-5))
    y = xnorconv.functional.batch_norm_add_prelu(x, None, None, None, None, None, ops["slope"], True)
    assert torch.equal(y, composition(x, None, None, None, None, None, ops["slope"], True, 0.1, 1e-5))


def test_same_result_on_any_number_of_threads():
    ops = operands((4, 48, 40, 40), torch.contiguous_format, 6)
    g = torch.randn(4, 48, 40, 40)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for layout in LAYOUTS.values():
                laid = {k: v.contiguous(memory_format=layout) if v.dim() == 4 else v for k, v in ops.items()}
                out, grads, rm, rv = run(xnorconv.functional.batch_norm_add_prelu, laid, g)
                results.append((layout, [out.contiguous(), *[t.contiguous() for t in grads], rm, rv]))
    finally:
        torch.set_num_threads(before)
    for layout, tensors in results:
        first = next(r for r in results if r[0] == layout)[1]
        assert all(torch.equal(a, b) for a, b in zip(tensors, first)), layout


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_opcheck(layout):
    x = torch.randn(2, 6, 5, 4).contiguous(memory_format=layout)
    g, r = torch.randn_like(x), torch.randn_like(x)
    gamma, beta, w = torch.rand(6) + 0.5, torch.randn(6), torch.rand(6)
    torch.library.opcheck(torch.ops.xnorconv.channel_moments.default, (x,))
    mean, var = torch.ops.xnorconv.channel_moments(x)
    invstd = var.add(1e-5).rsqrt()
    torch.library.opcheck(torch.ops.xnorconv.batch_norm_add_prelu.default, (x, mean, invstd, gamma, beta, r, w))
    torch.library.opcheck(torch.ops.xnorconv.batch_norm_add_prelu.default, (x, mean, invstd, gamma, beta, None, w[:1]))
    _, z = torch.ops.xnorconv.batch_norm_add_prelu(x, mean, invstd, gamma, beta, r, w)
    for batch_stats in (True, False):
        torch.library.opcheck(torch.ops.xnorconv.batch_norm_add_prelu_backward.default,
                              (g, z, x, mean, invstd, gamma, w, batch_stats))


def bn_forward(x=None, mean=3, invstd=3, weight=3, bias=3, residual=None, prelu=3):
    """torch.ops.xnorconv.batch_norm_add_prelu on a (2, 3, 4, 4) input, with (C,) operands of the given sizes."""
    x = torch.randn(2, 3, 4, 4) if x is None else x
    vec = {n: torch.ones(k) if isinstance(k, int) else k for n, k in
           dict(mean=mean, invstd=invstd, weight=weight, bias=bias, prelu=prelu).items()}
    return torch.ops.xnorconv.batch_norm_add_prelu(x, vec["mean"], vec["invstd"], vec["weight"], vec["bias"],
                                                   residual, vec["prelu"])


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.xnorconv.channel_moments(torch.randn(5)),
     r"channel_moments: input must have a batch and a channel dimension .* got a 1-D tensor"),
    (lambda: bn_forward(mean=2), r"batch_norm_add_prelu: mean must have shape \(3,\) .* got \[2\]"),
    (lambda: bn_forward(bias=torch.zeros(3, 1)),
     r"batch_norm_add_prelu: bias must have shape \(3,\) .* got \[3, 1\]"),
    (lambda: bn_forward(residual=torch.randn(2, 3, 4, 5)),
     r"batch_norm_add_prelu: residual must have the input's shape \[2, 3, 4, 4\], got \[2, 3, 4, 5\]"),
    (lambda: bn_forward(prelu=2),
     r"batch_norm_add_prelu: prelu_weight must have shape \(1,\) or \(3,\) .* got \[2\]"),
    (lambda: bn_forward(invstd=torch.ones(3).double()), r"batch_norm_add_prelu: invstd must be float32, got Double"),
    (lambda: torch.ops.xnorconv.batch_norm_add_prelu_backward(torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 3),
                                                              torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3),
                                                              torch.ones(3), torch.ones(3), True),
     r"batch_norm_add_prelu_backward: z must have the input's shape \[2, 3, 4, 4\], got \[2, 3, 4, 3\]"),
])
def test_errors_name_the_argument(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_one_value_per_channel_in_training_is_refused_as_batch_norm_does():
    x = torch.randn(1, 4, 1, 1, requires_grad=True)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        xnorconv.functional.batch_norm_add_prelu(x, None, None, None, torch.ones(4), torch.zeros(4), torch.ones(4),
                                                 True)


@pytest.mark.parametrize("training, momentum", [(True, 0.1), (True, None), (False, 0.1)],
                         ids=["training", "training-cumulative", "frozen-statistics"])
def test_binary_dnet53_unit(training, momentum):
    """A BinaryDNet53 unit takes the two-pass form in training, and in evaluation mode while gradients are recorded
    (fine-tuning with frozen BatchNorm statistics): the same output, gradients and BatchNorm state as
    PReLU(BN(conv(x)) + shortcut(x)) through the modules. Without gradients (inference) it is that composition."""
    torch.manual_seed(7)
    unit = BinaryConvUnit(8, 16, 3, 2)
    unit.bn.momentum = momentum
    unit.bn.running_mean.normal_()
    unit.bn.running_var.uniform_(0.5, 1.5)
    unit.train(training)
    twin = copy.deepcopy(unit)
    x = torch.randn(4, 8, 12, 12)
    for _ in range(2):  # twice: the cumulative average (momentum None) depends on num_batches_tracked
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1 = unit(x1)
        assert type(y1.grad_fn).__name__ == "_BatchNormAddPReLUFunctionBackward"
        y2 = F.prelu(twin.bn(twin.conv(x2)) + twin.shortcut(x2), twin.act.weight)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(y1)
        y1.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(unit.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)
    for (name, a), (_, b) in zip(unit.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert unit.bn.num_batches_tracked.item() == (2 if training else 0)
    if not training:
        with torch.no_grad():
            assert torch.equal(unit(x), F.prelu(twin.bn(twin.conv(x)) + twin.shortcut(x), twin.act.weight))
