"""Triton implementation of the binary convolution forward op: a second GPU backend, independent of the CUDA C++
kernels, with the same semantics as torch.ops.xnorconv.binary_conv2d_packed (see xnorconv.testing.reference_conv2d).

Runs wherever Triton runs: on an NVIDIA/AMD GPU, and on the CPU under Triton's interpreter (TRITON_INTERPRET=1,
which must be set before this module is imported), which is how tests/test_triton.py checks it on a GPU-less machine.

Layout (int32 words, so the kernels only use 32-bit integer ops):
  activations [N][H][W][groups][words32], channel c of a group at bit c % 32 of word c // 32, 1 meaning -1,
  bits past the group's channels 0; the image is not padded.
  weights [O][kh][kw][words32], the same order. (The int64 words of pack_weight viewed as int32 pairs are exactly
  this on a little-endian machine; here they are built with torch ops so the Triton path needs no compiled code.)
A padded tap loads a zero word (sign +1), then the epilogue applies
  dot = Cg * taps - 2 * popcount_total + (pad_value - 1) * (sum of tap_sum[o][t] over the padded taps t),
the same identity as the CUDA kernels (csrc/cuda/device_logic.h).
"""
import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._checks import (check_bool, check_input_shortcut, check_op_input, check_pad_value, check_positive_int,
                      normalize_conv_args, per_channel)
from .functional import real_shortcut

# Where use_backend('triton') sends the op's calls: GPUs, and the CPU when the kernels run in the interpreter.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE_TYPES = ("cuda", "cpu") if INTERPRETED else ("cuda",)


@triton.jit
def _popcount32(x):
    # SWAR popcount on int32 (arithmetic shifts are harmless: every step masks the bits they fill).
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    x = x + (x >> 8)
    x = x + (x >> 16)
    return x & 0x3F


@triton.jit
def _pack_kernel(x_ptr, t_ptr, out_ptr, total, H, W, CG, WORDS, GW, sn, sc, sh, sw, HAS_THRESHOLD: tl.constexpr,
                 SIGNS: tl.constexpr, BLOCK: tl.constexpr):
    # SIGNS: x is a bool tensor viewed as uint8 (already binarized: nonzero means -1, like the CPU and CUDA packs).
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    pix = e // GW
    wi = e % GW
    g = wi // WORDS
    w = wi % WORDS
    n = pix // (H * W)
    hw = pix % (H * W)
    h = hw // W
    col = hw % W
    base = n.to(tl.int64) * sn + h.to(tl.int64) * sh + col.to(tl.int64) * sw
    bits = tl.zeros([BLOCK], dtype=tl.int32)
    for b in tl.static_range(32):
        c = w * 32 + b
        valid = mask & (c < CG)
        if SIGNS:
            negative = tl.load(x_ptr + base + (g * CG + c).to(tl.int64) * sc, mask=valid, other=0) != 0
        else:
            v = tl.load(x_ptr + base + (g * CG + c).to(tl.int64) * sc, mask=valid, other=0.0)
            if HAS_THRESHOLD:  # sign(x - t) computed as x >= t, like the CPU and CUDA kernels
                t = tl.load(t_ptr + g * CG + c, mask=valid, other=0.0)
            else:
                t = 0.0
            negative = (v >= t) == 0  # NaN >= t is false: NaN packs as -1, like everywhere else
        bits = bits | ((negative & valid).to(tl.int32) << b)
    tl.store(out_ptr + e.to(tl.int64), bits, mask=mask)


@triton.jit
def _conv_kernel(a_ptr, w_ptr, ts_ptr, scale_ptr, bias_ptr, res_ptr, slope_ptr, thr_ptr, out_ptr,
                 N, H, W, OH, OW, O, CG, OG, KH, KW, SH, SW, PT, PL, DH, DW, WORDS, GW, PV, CHANNEL_BLOCKS,
                 osn, osc, osh, osw, rsn, rsc, rsh, rsw,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 HAS_PRELU: tl.constexpr, OUT_SIGNS: tl.constexpr, HAS_OUT_THRESHOLD: tl.constexpr,
                 BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_o = tl.program_id(1)
    g = pid_o // CHANNEL_BLOCKS
    cb = pid_o % CHANNEL_BLOCKS
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < N * OH * OW
    n = p // (OH * OW)
    r = p % (OH * OW)
    oh = r // OW
    ow = r % OW
    j = cb * BLOCK_O + tl.arange(0, BLOCK_O)
    omask = j < OG
    o = g * OG + j
    taps = KH * KW
    acc = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.int32)
    padded = tl.zeros([BLOCK_P, BLOCK_O], dtype=tl.int32)
    for kh in range(KH):
        for kw in range(KW):
            ih = oh * SH - PT + kh * DH
            iw = ow * SW - PL + kw * DW
            valid = pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            t = kh * KW + kw
            ts = tl.load(ts_ptr + o * taps + t, mask=omask, other=0)
            padded += tl.where(valid[:, None], 0, ts[None, :])
            a_base = ((n.to(tl.int64) * H + ih) * W + iw) * GW + g * WORDS
            w_base = (o.to(tl.int64) * taps + t) * WORDS
            for w in range(WORDS):
                a = tl.load(a_ptr + a_base + w, mask=valid, other=0)
                b = tl.load(w_ptr + w_base + w, mask=omask, other=0)
                acc += _popcount32(a[:, None] ^ b[None, :])
    dot = CG * taps - 2 * acc + (PV - 1) * padded
    # The output stage in the CPU kernels' float operations and order: y = fma(scale, dot, bias); y += residual;
    # y = y >= 0 ? y : slope * y; then y, or the sign byte !(y >= threshold). (tl.fma is one rounding on a GPU;
    # Triton's interpreter evaluates it as a * b + c in float32, two roundings.)
    y = dot.to(tl.float32)
    if HAS_SCALE or HAS_BIAS:
        scale = tl.full([BLOCK_O], 1.0, tl.float32)
        bias = tl.zeros([BLOCK_O], dtype=tl.float32)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + o, mask=omask, other=1.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + o, mask=omask, other=0.0)
        y = tl.fma(tl.broadcast_to(scale[None, :], [BLOCK_P, BLOCK_O]), y,
                   tl.broadcast_to(bias[None, :], [BLOCK_P, BLOCK_O]))
    mask = pmask[:, None] & omask[None, :]
    if HAS_RESIDUAL:  # the residual's own strides: any memory format
        r_off = (n.to(tl.int64)[:, None] * rsn + o.to(tl.int64)[None, :] * rsc + oh.to(tl.int64)[:, None] * rsh
                 + ow.to(tl.int64)[:, None] * rsw)
        y = y + tl.load(res_ptr + r_off, mask=mask, other=0.0)
    if HAS_PRELU:
        slope = tl.load(slope_ptr + o, mask=omask, other=1.0)
        y = tl.where(y >= 0, y, slope[None, :] * y)  # NaN takes the multiply (and stays NaN), as on the CPU
    out_off = (n.to(tl.int64)[:, None] * osn + o.to(tl.int64)[None, :] * osc + oh.to(tl.int64)[:, None] * osh
               + ow.to(tl.int64)[:, None] * osw)
    if OUT_SIGNS:
        if HAS_OUT_THRESHOLD:
            thr = tl.load(thr_ptr + o, mask=omask, other=0.0)
        else:
            thr = tl.zeros([BLOCK_O], dtype=tl.float32)
        negative = (y >= thr[None, :]) == 0  # NaN -> -1 (True), the sign rule
        tl.store(out_ptr + out_off, negative.to(tl.uint8), mask=mask)
    else:
        tl.store(out_ptr + out_off, y, mask=mask)


def pack_weight_words(weight: torch.Tensor):
    """(O, Cg, kh, kw) float -> (bits int32 (O, kh, kw, ceil(Cg/32)), tap_sum int32 (O, kh, kw)), torch ops only."""
    o, cg, kh, kw = weight.shape
    words = (cg + 31) // 32
    negative = ~(weight.detach().float() >= 0)  # (O, Cg, kh, kw); NaN -> negative
    tap_sum = (cg - 2 * negative.sum(dim=1)).to(torch.int32)
    neg = negative.permute(0, 2, 3, 1)  # (O, kh, kw, Cg)
    neg = torch.nn.functional.pad(neg.to(torch.int64), (0, words * 32 - cg)).reshape(o, kh, kw, words, 32)
    shifts = torch.arange(32, device=weight.device, dtype=torch.int64)
    word = (neg << shifts).sum(dim=-1)  # 0 .. 2^32 - 1
    word = torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)
    return word.contiguous(), tap_sum.contiguous()


def binary_conv2d(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1,
                  padding=0, dilation=1, groups: int = 1, scale: Optional[torch.Tensor] = None, pad_value: int = 0,
                  input_threshold: Optional[torch.Tensor] = None, block_p: int = 32, block_o: int = 32, *,
                  output_signs: bool = False, output_threshold: Optional[torch.Tensor] = None,
                  residual: Optional[torch.Tensor] = None, prelu_weight: Optional[torch.Tensor] = None,
                  input_shortcut: bool = False) -> torch.Tensor:
    """Same arguments and result as xnorconv.binary_conv2d, computed by the Triton kernels: float32 or bool (sign)
    input, output_signs / output_threshold, the fused residual + PReLU, and a channels_last output for a
    channels_last input (the op's rule). The tensors must be on a device Triton can run on (a GPU, or the CPU in
    interpreter mode)."""
    check_op_input(input)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError(f"weight must be a 4-D tensor (O, C/groups, kh, kw), got {getattr(weight, 'shape', weight)!r}")
    check_positive_int("groups", groups)
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    _, cg, kh, kw = weight.shape
    stride, pads, dilation = normalize_conv_args((kh, kw), stride, padding, dilation)
    bits, tap_sum = pack_weight_words(weight)
    return _run(input, bits, tap_sum, cg, bias, stride, pads, dilation, groups, scale, pad_value, input_threshold,
                output_signs, output_threshold, residual, prelu_weight, block_p, block_o, input_shortcut)


def binary_conv2d_packed(input, weight_bits, weight_tap_sum, weight_in_channels, scale, bias, stride, padding,
                         dilation, groups, pad_value, input_threshold=None, output_signs=False, output_threshold=None,
                         residual=None, prelu_weight=None, input_shortcut=False) -> torch.Tensor:
    """torch.ops.xnorconv.binary_conv2d_packed's arguments and result, computed by the Triton kernels: what
    xnorconv.use_backend('triton') routes the op's calls on Triton's devices to. The int64 words of pack_weight
    viewed as int32 pairs are the Triton kernels' weight words (little-endian), so the packed weight is used as it is
    (its one word past ceil(C/32) when C/groups is at most 32 past a multiple of 64 is dropped)."""
    check_op_input(input)
    if not (isinstance(weight_bits, torch.Tensor) and weight_bits.dim() == 4 and weight_bits.dtype == torch.int64):
        raise ValueError("weight_bits must be the int64 (O, kh, kw, words) tensor from pack_weight, got "
                         f"{getattr(weight_bits, 'dtype', type(weight_bits).__name__)} of shape "
                         f"{tuple(getattr(weight_bits, 'shape', ()))}")
    check_positive_int("weight_in_channels", weight_in_channels)
    if weight_bits.device != input.device or weight_tap_sum.device != input.device:
        raise ValueError(f"packed weight is on {weight_bits.device} but input is on {input.device}")
    words32 = (weight_in_channels + 31) // 32
    if weight_bits.shape[3] != (weight_in_channels + 63) // 64:
        raise ValueError(f"weight_in_channels ({weight_in_channels}) does not match the packed weight's "
                         f"{weight_bits.shape[3]} words per tap")
    bits = weight_bits.contiguous().view(torch.int32)[..., :words32].contiguous()
    return _run(input, bits, weight_tap_sum.contiguous(), weight_in_channels, bias, tuple(stride), tuple(padding),
                tuple(dilation), groups, scale, pad_value, input_threshold, output_signs, output_threshold, residual,
                prelu_weight, 32, 32, input_shortcut)


def _run(input, bits, tap_sum, cg, bias, stride, pads, dilation, groups, scale, pad_value, input_threshold,
         output_signs, output_threshold, residual, prelu_weight, block_p, block_o, input_shortcut=False):
    """The shared checks and launch: bits int32 (O, kh, kw, ceil(cg/32)), tap_sum int32 (O, kh, kw), stride and
    dilation pairs, pads (top, bottom, left, right). input_shortcut: the shortcut is composed (real_shortcut) and
    added as the residual."""
    check_positive_int("groups", groups)
    check_bool("output_signs", output_signs)
    out_channels, kh, kw = bits.shape[0], bits.shape[1], bits.shape[2]
    if input.shape[1] != cg * groups:
        raise ValueError(f"input has {input.shape[1]} channels but the weight expects {cg * groups} "
                         f"({cg} per group x groups={groups})")
    if out_channels % groups:
        raise ValueError(f"weight has {out_channels} output channels, not divisible by groups={groups}")
    (sh, sw), (pt, pb, pl, pr), (dh, dw) = stride, pads, dilation
    pv = check_pad_value(pad_value)
    signs = input.dtype == torch.bool
    scale, bias = per_channel(scale, "scale"), per_channel(bias, "bias")
    threshold = per_channel(input_threshold, "input_threshold")
    out_threshold = per_channel(output_threshold, "output_threshold")
    slope = per_channel(prelu_weight, "prelu_weight")
    if threshold is not None and signs:
        raise ValueError("input_threshold applies to float input; this input is bool (already binarized)")
    if out_threshold is not None and not output_signs:
        raise ValueError("output_threshold is only used with output_signs=True")
    if slope is not None and slope.shape == (1,):
        slope = slope.expand(out_channels)  # one shared slope
    for name, t, size in (("scale", scale, out_channels), ("bias", bias, out_channels),
                          ("input_threshold", threshold, input.shape[1]),
                          ("output_threshold", out_threshold, out_channels),
                          ("prelu_weight", slope, out_channels)):
        if t is not None and (t.shape != (size,) or t.device != input.device):
            raise ValueError(f"{name} must have shape ({size},) on {input.device}, got {tuple(t.shape)} on {t.device}")
    # The kernels index a per-channel tensor as base + channel: a strided view would be read at the wrong places and
    # an expanded one (stride 0, one element behind it) past its end. Contiguous copies where needed (no copy else).
    scale, bias, threshold, out_threshold, slope = (None if t is None else t.contiguous()
                                                    for t in (scale, bias, threshold, out_threshold, slope))

    n, c, h, w = input.shape
    oh = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"kernel size ({kh}, {kw}) with dilation ({dh}, {dw}) is larger than the padded input "
                         f"({h + pt + pb}, {w + pl + pr})")
    if check_input_shortcut(input_shortcut, residual, input, stride, (oh, ow)):
        residual = real_shortcut(input, out_channels, sh)
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.shape != (n, out_channels, oh, ow) \
                or residual.dtype != torch.float32 or residual.device != input.device:
            raise ValueError(f"residual must be a float32 tensor of the output's shape {(n, out_channels, oh, ow)} "
                             f"on {input.device}, got {getattr(residual, 'dtype', None)} "
                             f"{tuple(getattr(residual, 'shape', ()))}")
        residual = residual.detach()
    # The op's rule (and its fake kernel's): a channels_last input gets a channels_last output.
    channels_last = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous() and c > 1
    out = torch.empty((n, out_channels, oh, ow), device=input.device,
                      dtype=torch.bool if output_signs else torch.float32,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if n == 0:
        return out
    # Triton launches on the current CUDA device: make it the inputs' one (no-op on the CPU interpreter).
    guard = torch.cuda.device(input.device) if input.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _launch(input, bits, tap_sum, cg, out, scale, bias, threshold, out_threshold, slope, residual, signs,
                output_signs, groups, (sh, sw), (pt, pl), (dh, dw), pv, block_p, block_o)
    return out


def _launch(input, bits, tap_sum, cg, out, scale, bias, threshold, out_threshold, slope, residual, signs,
            output_signs, groups, stride, pads, dilation, pv, block_p, block_o):
    (sh, sw), (pt, pl), (dh, dw) = stride, pads, dilation
    n, _, h, w = input.shape
    out_channels, kh, kw = bits.shape[0], bits.shape[1], bits.shape[2]
    oh, ow = out.shape[2], out.shape[3]
    words = (cg + 31) // 32
    packed = torch.empty((n, h, w, groups, words), device=input.device, dtype=torch.int32)
    total = packed.numel()
    block = 128
    x = input.view(torch.uint8) if signs else input
    _pack_kernel[(triton.cdiv(total, block),)](x, threshold if threshold is not None else x,
                                               packed, total, h, w, cg, words, groups * words, *input.stride(),
                                               HAS_THRESHOLD=threshold is not None, SIGNS=signs, BLOCK=block)
    og = out_channels // groups
    channel_blocks = triton.cdiv(og, block_o)
    grid = (triton.cdiv(n * oh * ow, block_p), groups * channel_blocks)
    out_view = out.view(torch.uint8) if output_signs else out
    dummy = packed  # never read when the matching HAS_* flag is False
    _conv_kernel[grid](packed, bits, tap_sum, scale if scale is not None else dummy,
                       bias if bias is not None else dummy, residual if residual is not None else dummy,
                       slope if slope is not None else dummy,
                       out_threshold if out_threshold is not None else dummy, out_view,
                       n, h, w, oh, ow, out_channels, cg, og, kh, kw, sh, sw, pt, pl, dh, dw, words, groups * words,
                       pv, channel_blocks, *out.stride(), *(residual.stride() if residual is not None else (0,) * 4),
                       HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                       HAS_PRELU=slope is not None, OUT_SIGNS=output_signs,
                       HAS_OUT_THRESHOLD=out_threshold is not None, BLOCK_P=block_p, BLOCK_O=block_o)
