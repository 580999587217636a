"""python -m bench.first_layer: what freeze's first_layer choices gain and cost, every figure from this run.

  1. The stem alone: PyTorch's float layers, StemConv2d (first_layer="float"), int8 (Int8Conv2d) and the other
     kernels considered for it, batch 1.
  2. Whole frozen models with the stem kept as PyTorch runs it, as a StemConv2d and in int8: binarized torchvision
     resnet18 at 224 and binary_dnet53 at 128, beside their fp32 twins (eager, and TorchScript as the model suite
     deploys them), batch 1.
  3. The accuracy effect on real photographs (hymenoptera: calibration on train/, evaluation on val/, ImageNet
     transforms): the stem's output and the logits of the int8-stem model against the float-stem model, and how
     often their top-1 classes agree. Models with random weights whose BatchNorm statistics are set on the train/
     photos (`--dnet53-checkpoint` takes a trained binary_dnet53 from `python -m train fit`), plus the float
     resnet18 itself with an int8 stem.

All timings: one thread, interleaved medians in one process (bench/timing.py), load average recorded before and
after. `--out FILE` also writes the report between the markers of FILE (docs/perf/first_layer.md).

  python -m bench.first_layer [--data ../shared/data/hymenoptera] [--reps 40] [--out docs/perf/first_layer.md]
"""
import argparse
import copy
import datetime
import os
import platform
import shlex
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import xnorconv

from .model_suite import _logits, check_deployed, deployed
from .timing import cpu_model, interleaved, median_ms

BEGIN, END = "<!-- first_layer results: begin -->", "<!-- first_layer results: end -->"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CL = torch.channels_last


def _load():
    return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _no_grad(fn, *args):
    def call():
        with torch.no_grad():
            return fn(*args)
    return call


# ---- 1. the stem alone ----

def _stems():
    import torchvision

    import models
    torch.manual_seed(0)
    r = torchvision.models.resnet18().eval()
    d = models.create("binary_dnet53", 6).eval()
    a = models.create("reactnet_a", 1000).eval()
    return [("resnet18: conv 7x7/2 3->64, BN, ReLU, max pool 3x3/2", nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool),
             224, True),
            ("reactnet_a: conv 3x3/2 3->32, BN", nn.Sequential(a.stem.conv, a.stem.bn), 224, False),
            ("binary_dnet53: conv 3x3 3->16, BN, PReLU", nn.Sequential(*d.stem), 128, False)]


def _folded_float(stem):
    conv, bn = stem[0], stem[1]
    inv = torch.rsqrt(bn.running_var + bn.eps) * bn.weight
    w = (conv.weight * inv.view(-1, 1, 1, 1)).detach().contiguous(memory_format=CL)
    b = (bn.bias - bn.running_mean * inv).detach()
    rest = stem[2:]
    return lambda x: rest(F.conv2d(x, w, b, conv.stride, conv.padding))


def _onednn_direct(int8_layer, rest):
    """oneDNN's own int8 convolution with the dequantization fused (float32 output, ReLU fused), the op PyTorch's
    PT2E / Inductor flow lowers to; the input is quantized with plain tensor ops, as that flow does."""
    s, z = int8_layer.input_scale, int8_layer.input_zero_point
    packed = torch.ops.onednn.qconv_prepack(int8_layer.weight, int8_layer.weight_scale, s, z, list(int8_layer.stride),
                                            list(int8_layer.padding), list(int8_layer.dilation), 1, None)
    zeros = torch.zeros(int8_layer.out_channels, dtype=torch.int64)
    attr = "relu" if int8_layer.relu else "none"

    def run(x):
        q = x.mul(1 / s).round_().add_(z).clamp_(0, 255).to(torch.int32).to(torch.uint8)
        y = torch.ops.onednn.qconv2d_pointwise(q, s, z, packed, int8_layer.weight_scale, zeros, int8_layer.bias,
                                               list(int8_layer.stride), list(int8_layer.padding),
                                               list(int8_layer.dilation), 1, 1.0, 0, torch.float32, attr, [], "")
        return rest(y)
    return run


def _fbgemm_copy(int8_layer):
    """The same layer with its weight packed for fbgemm, the x86 engine's other kernel family."""
    layer = copy.deepcopy(int8_layer)
    import xnorconv._first_layer as first_layer  # the engine is internal; the comparison needs to switch it
    previous, first_layer._ENGINE = first_layer._ENGINE, "fbgemm"
    try:
        layer._packed_weight()
    finally:
        first_layer._ENGINE = previous
    return layer


def stem_section(reps):
    lines = ["### 1. The stem alone (batch 1, one thread)", "",
             "Input: standard normal values; the int8 layers are calibrated on 8 such images. `error` is max |output "
             "- float output| / max |float output| on the timed input. Layout: the input's; `channels_last` rows get "
             "channels_last inputs and weights, as a frozen model running channels_last gives them.", ""]
    for title, stem, size, pool in _stems():
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(1, 3, size, size, generator=gen)
        xcl = x.contiguous(memory_format=CL)
        cal = torch.randn(8, 3, size, size, generator=gen)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            int8 = xnorconv.freeze(nn.Sequential(copy.deepcopy(stem)), first_layer="int8", calibration=cal,
                                   memory_format=torch.contiguous_format)[0]
        layer = int8[0]
        rest = nn.Sequential(*[m for m in int8[1:] if not isinstance(m, nn.Identity)])
        # StemConv2d with each convolution it can run (freeze's choice is printed below the table); the max pool in
        # the kernel's pass after xnorconv's convolution, in xnorconv's pool (with the ReLU) after PyTorch's.
        act = next((m for m in stem[2:] if isinstance(m, (nn.ReLU, nn.PReLU, nn.LeakyReLU))), None)
        pool_layer = stem[3] if pool else None

        def fused_stem(implementation):
            return nn.Sequential(
                xnorconv.StemConv2d.from_float(stem[0], stem[1], act, pool_layer, implementation).eval(),
                *[m for m in stem[2:] if m is not act and m is not pool_layer])
        chosen = fused_stem("auto")[0]
        stem_rows = {f"**float: StemConv2d (BN, activation and max pool fused), {kernel}, {layout}**":
                     (fused_stem(implementation), inp)
                     for implementation, kernel in (("xnorconv", "xnorconv's kernel"),
                                                    ("pytorch", "PyTorch's convolution"))
                     for layout, inp in (("NCHW", x), ("channels_last", xcl))}
        if pool:  # what the pool in the kernel's pass saves: the same kernel with the pool as a pass of its own
            unpooled = xnorconv.StemConv2d.from_float(stem[0], stem[1], act, None, "xnorconv").eval()
            stem_rows["float: StemConv2d, xnorconv's kernel, then the max pool as a pass of its own "
                      "(xnorconv.MaxPool2d), NCHW"] = (nn.Sequential(unpooled, xnorconv.MaxPool2d(
                          pool_layer.kernel_size, pool_layer.stride, pool_layer.padding,
                          ceil_mode=pool_layer.ceil_mode)), x)
        float_cl = copy.deepcopy(stem).to(memory_format=CL)
        bf16 = copy.deepcopy(stem).to(torch.bfloat16, memory_format=CL)
        fbgemm = nn.Sequential(_fbgemm_copy(layer), *rest)
        pool_after = stem[3] if pool else nn.Identity()
        direct = _onednn_direct(layer, nn.Sequential(*rest, pool_after) if pool else rest)
        candidates = {
            "float (nn.Conv2d, BatchNorm2d, ...), NCHW": (stem, x),
            "float, channels_last": (float_cl, xcl),
            "float, BatchNorm folded into the conv, channels_last": (_folded_float(float_cl), xcl),
            **stem_rows,
            "**int8: Int8Conv2d (oneDNN engine), NCHW input**": (int8, x),
            "**int8: Int8Conv2d (oneDNN engine), channels_last**": (int8, xcl),
            "int8, the same layer packed for fbgemm, channels_last": (fbgemm, xcl),
            "int8, oneDNN qconv2d_pointwise (fused float output)" + (" + float max pool" if pool else "")
            + ", channels_last": (direct, xcl),
            "bfloat16 (AMX where present), channels_last": (lambda t: bf16(t.to(torch.bfloat16)).float(), xcl),
        }
        with torch.no_grad():
            want = stem(x)
            scale = float(want.abs().max())
            errors = {k: float((fn(inp) - want).abs().max()) / scale for k, (fn, inp) in candidates.items()}
            calls = {k: _no_grad(fn, inp) for k, (fn, inp) in candidates.items()}
            load_before = _load()
            t = interleaved(calls, reps)
            load_after = _load()
        base = median_ms(t[next(iter(candidates))])
        best_float = min(median_ms(t[k]) for k in candidates if k.startswith("float"))
        rows = [(k, f"{median_ms(t[k]):.3f}", f"{base / median_ms(t[k]):.2f}x", f"{best_float / median_ms(t[k]):.2f}x",
                 f"{errors[k]:.1e}") for k in candidates]
        lines += [f"**{title}, {size}x{size}** ({reps} rounds; {load_before} before, {load_after} after)", "",
                  _table(("implementation", "median ms", "speedup vs float NCHW", "vs fastest float", "error"), rows),
                  ""]
        lines += ["freeze's StemConv2d (implementation='auto') runs " + ", ".join(
            f"{'xnorconv' if direct else 'PyTorch'}'s convolution on {layout} inputs"
            for layout, direct in (("NCHW", chosen.direct), ("channels_last", chosen.direct_channels_last)))
            + " for this stem here.", ""]
    return lines


# ---- 2. whole models ----

def _whole_models(size_r18=224, size_dnet=128):
    import torchvision

    import models
    torch.manual_seed(0)
    out = []
    gen = torch.Generator().manual_seed(2)
    r18 = torchvision.models.resnet18(num_classes=1000).eval()
    binary = xnorconv.binarize(r18, learnable_threshold=True).eval()  # as bench --models builds it
    cal = torch.randn(8, 3, size_r18, size_r18, generator=gen)
    x = torch.randn(1, 3, size_r18, size_r18, generator=gen)
    out.append(("resnet18", x, r18, xnorconv.freeze(binary, first_layer="keep"), xnorconv.freeze(binary),
                xnorconv.freeze(binary, first_layer="int8", calibration=cal)))
    dnet = models.create("binary_dnet53", 6).eval()
    twin = models.create("binary_dnet53_float", 6).eval()
    cal = torch.randn(8, 3, size_dnet, size_dnet, generator=gen)
    x = torch.randn(1, 3, size_dnet, size_dnet, generator=gen)
    out.append(("binary_dnet53", x, twin, xnorconv.freeze(dnet, first_layer="keep"), xnorconv.freeze(dnet),
                xnorconv.freeze(dnet, first_layer="int8", calibration=cal)))
    return out


def model_section(reps):
    lines = ["### 2. Whole models (batch 1, one thread)", "",
             "Random weights (speed does not depend on them); the int8 stems are calibrated on 8 standard normal "
             "images. Frozen models use freeze()'s default memory_format='auto' (measured on their first call). "
             "TorchScript: torch.jit.trace + torch.jit.freeze, as `python -m bench --models` deploys, each checked "
             "against its eager model first. `fp32 / this`: the fp32 twin's eager latency over this row's. `kept "
             "stem / this`: the same model frozen with first_layer='keep' (its stem as PyTorch runs it) over this "
             "row, same mode. first_layer='float' makes a StemConv2d of both stems: xnorconv's kernel for "
             "binary_dnet53's; for resnet18's (64 output channels) the convolution timed faster when it is built "
             "(table 1), with the BatchNorm folded, and the max pool in the kernel's pass (after PyTorch's "
             "convolution, xnorconv's max pool with the ReLU).", ""]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = _whole_models()
    calls, labels = {}, {}
    for name, x, fp32, frozen_keep, frozen_float, frozen_int8 in built:
        variants = {f"{name} fp32 (float twin)": fp32, f"{name} binary, first_layer='keep'": frozen_keep,
                    f"{name} binary, first_layer='float' (default)": frozen_float,
                    f"{name} binary, first_layer='int8'": frozen_int8}
        with torch.no_grad():
            for label, model in variants.items():
                model(x)  # the frozen models' layout measurement happens here, before any timing
                calls[(label, "eager")] = _no_grad(model, x)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    scripted = deployed(model, "torchscript", x, workdir=None)
                check_deployed(label, "torchscript", model, scripted, x)
                calls[(label, "torchscript")] = _no_grad(scripted, x)
                labels[label] = (name, x.shape[-1])
    load_before = _load()
    t = interleaved(calls, reps)
    load_after = _load()
    rows = []
    for label, (name, size) in labels.items():
        fp32_eager = median_ms(t[(f"{name} fp32 (float twin)", "eager")])
        kept = {m: median_ms(t[(f"{name} binary, first_layer='keep'", m)]) for m in ("eager", "torchscript")}
        for mode in ("eager", "torchscript"):
            ms = median_ms(t[(label, mode)])
            gain = "" if "fp32" in label or "'keep'" in label else f"{kept[mode] / ms:.2f}x"
            rows.append((label, size, mode, f"{ms:.2f}", f"{fp32_eager / ms:.2f}x", gain))
    lines += [f"({reps} rounds; {load_before} before, {load_after} after)", "",
              _table(("model", "input", "mode", "median ms", "fp32 / this", "kept stem / this"), rows), ""]
    return lines


# ---- 3. accuracy on photographs ----

def _photos(root, size, limit=None, seed=0):
    from torchvision import datasets, transforms
    # As python -m train evaluates: the whole photo resized to size x size, ImageNet normalisation.
    tf = transforms.Compose([transforms.Resize((size, size), antialias=True), transforms.ToTensor(),
                             transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ds = datasets.ImageFolder(root, tf)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    if limit is not None:
        order = order[:limit]
    images = torch.stack([ds[i][0] for i in order])
    labels = torch.tensor([ds[i][1] for i in order])
    return images, labels


@torch.no_grad()
def _set_bn_statistics(model, images, batch=32):
    """BatchNorm running statistics from these images (cumulative average), in place: random weights, but every
    layer's inputs normalised as a trained network's would be."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for i in range(0, len(images), batch):
        model(images[i:i + batch])
    return model.eval()


def _next_layer_input(model, x, skip):
    """The input of the first weight layer called after the stem: the stem's output as the network sees it."""
    kinds = (nn.Conv2d, nn.Linear, xnorconv.FrozenBinaryConv2d)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0]) if not seen else None)
             for n, m in model.named_modules() if isinstance(m, kinds) and n not in skip]
    try:
        with torch.no_grad():
            logits = _logits(model(x))
    finally:
        for h in hooks:
            h.remove()
    return seen[0].float(), logits


def _compare(float_model, int8_model, images, labels, stem_name, batch=32):
    stems, logits = {"float": [], "int8": []}, {"float": [], "int8": []}
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        for key, model in (("float", float_model), ("int8", int8_model)):
            s, l = _next_layer_input(model, x, skip={stem_name})
            stems[key].append(s.contiguous())
            logits[key].append(l)
    sf, si = torch.cat(stems["float"]), torch.cat(stems["int8"])
    lf, li = torch.cat(logits["float"]), torch.cat(logits["int8"])
    ds, dl = (si - sf).abs(), (li - lf).abs()
    agree = int((li.argmax(1) == lf.argmax(1)).sum())
    row = {"stem: max dev / max": f"{float(ds.max() / sf.abs().max()):.2e}",
           "stem: mean dev / mean": f"{float(ds.mean() / sf.abs().mean()):.2e}",
           "logits: max dev / max": f"{float(dl.max() / lf.abs().max()):.2e}",
           "logits: mean dev / mean": f"{float(dl.mean() / lf.abs().mean()):.2e}",
           "logits: spread over images / mean": f"{float(lf.std(0).mean() / lf.abs().mean()):.2e}",
           "top-1 agreement": f"{agree}/{len(images)}"}
    if labels is not None:
        row["accuracy float / int8"] = (f"{float((lf.argmax(1) == labels).float().mean()):.3f} / "
                                        f"{float((li.argmax(1) == labels).float().mean()):.3f}")
    return row


class _WeightsOnly(nn.Module):
    """An Int8Conv2d's computation with float input and output: its int8 weights times their scales, its bias, ReLU
    and pool, in float32. Symmetric zero padding only (what the compared stems have)."""

    def __init__(self, layer: xnorconv.Int8Conv2d):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        layer = self.layer
        w = layer.weight.float() * layer.weight_scale.view(-1, 1, 1, 1)
        y = F.conv2d(x, w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        y = F.relu(y) if layer.relu else y
        return layer.pool(y) if layer.pool is not None else y


def _with_weights_only(int8_model):
    model = copy.deepcopy(int8_model)
    for name, m in list(model.named_modules()):
        if isinstance(m, xnorconv.Int8Conv2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _WeightsOnly(m))
    return model


def accuracy_section(data, calibration_images, dnet53_checkpoint):
    import torchvision

    import models
    lines = ["### 3. Accuracy effect on real photographs", "",
             f"`{data}`: the int8 stems are calibrated on {calibration_images} images drawn from train/ and compared "
             "on every image of val/; each photo resized to size x size with ImageNet normalisation (as "
             "`python -m train` evaluates). "
             "Random weights, BatchNorm statistics set on all of train/ (so each layer sees normalised inputs, as "
             "in a trained network) unless a checkpoint is named. `stem`: the input of the first weight layer after "
             "the stem (what the network receives from it). `dev`: absolute difference between the int8-stem and "
             "the float-stem model's values; `max` / `mean`: of the float-stem model's absolute values. `spread over "
             "images`: how much the float-stem model's logits vary from image to image (their standard deviation "
             "over images, mean over classes); near 0 means the logits hardly depend on the image. `int8 weights "
             "only` rows replace the int8 layer by a float convolution with its int8-rounded weights (float input "
             "and output): what the weight rounding alone does.", ""]
    torch.manual_seed(0)
    rows = []
    checkpoint = None
    dnet_size = 128
    if dnet53_checkpoint:
        from train.modeling import load_checkpoint, model_from_checkpoint
        checkpoint = load_checkpoint(dnet53_checkpoint)
        config = checkpoint["config"]
        if config.get("model") != "binary_dnet53" or config.get("normalize") != "imagenet":
            raise SystemExit(f"--dnet53-checkpoint {dnet53_checkpoint}: expected a binary_dnet53 trained with ImageNet "
                             f"normalisation, got model={config.get('model')!r}, normalize={config.get('normalize')!r}")
        dnet_size = int(config["image_size"])
    for size, specs in ((224, ("resnet18 fp32 (float network)", "resnet18 binarized")),
                        (dnet_size, ("binary_dnet53",))):
        train, _ = _photos(os.path.join(data, "train"), size)
        val, val_labels = _photos(os.path.join(data, "val"), size)
        cal = train[:calibration_images]
        for spec in specs:
            labels = None
            if spec.startswith("resnet18"):
                torch.manual_seed(0)
                model = torchvision.models.resnet18(num_classes=2)
                if "binarized" in spec:
                    model = xnorconv.binarize(model, learnable_threshold=True)
                model = _set_bn_statistics(model, train)
                stem_name, source = "conv1", "random weights, BN statistics from train/"
            elif checkpoint is not None:
                model = model_from_checkpoint(checkpoint)
                stem_name, source, labels = "stem.0", f"trained: {dnet53_checkpoint}", val_labels
            else:
                torch.manual_seed(0)
                model = _set_bn_statistics(models.create("binary_dnet53", 2), train)
                stem_name, source = "stem.0", "random weights, BN statistics from train/"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                float_model = xnorconv.freeze(model)
                int8_model = xnorconv.freeze(model, first_layer="int8", calibration=cal)
            rows.append({"model": f"{spec}, {size}x{size} ({source})",
                         **_compare(float_model, int8_model, val, labels, stem_name)})
            weights_only = _with_weights_only(int8_model)
            rows.append({"model": f"{spec}, int8 weights only",
                         **_compare(float_model, weights_only, val, labels, stem_name)})
    header = list(dict.fromkeys(k for r in rows for k in r))
    lines += [_table(header, [[r.get(k, "") for k in header] for r in rows]), ""]
    return lines


def report(args, argv):
    caps = torch.cpu.get_capabilities()
    int8_features = [k for k in ("avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16") if caps.get(k)]
    command = " ".join(shlex.quote(a) for a in ["python", "-m", "bench.first_layer", *argv])
    lines = [f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC by `{command}`; "
             f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.machine()} "
             f"({', '.join(int8_features) or 'no VNNI / AMX'}); threads: {torch.get_num_threads()}; torch "
             f"{torch.__version__}; xnorconv {xnorconv.__version__}; {_load()} at the start.", ""]
    lines += stem_section(args.reps)
    lines += model_section(args.model_reps)
    if args.data and os.path.isdir(args.data):
        lines += accuracy_section(args.data, args.calibration_images, args.dnet53_checkpoint)
    else:
        lines += ["### 3. Accuracy effect on real photographs", "", f"skipped: no photo folder at {args.data!r}", ""]
    return "\n".join(lines)


def write_between_markers(path, text):
    with open(path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"--out {path}: the file has no {BEGIN} ... {END} markers to write between")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="python -m bench.first_layer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join("..", "shared", "data", "hymenoptera"),
                    help="an ImageFolder root with train/ and val/ (default: ../shared/data/hymenoptera)")
    ap.add_argument("--calibration-images", type=int, default=32)
    ap.add_argument("--dnet53-checkpoint", default=None,
                    help="a python -m train checkpoint of binary_dnet53 (ImageNet normalisation) to compare instead "
                         "of random weights, at its training size; labels then give accuracies")
    ap.add_argument("--reps", type=int, default=40, help="timed rounds of each stem implementation")
    ap.add_argument("--model-reps", type=int, default=30, help="timed rounds of each whole model and mode")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the report between the markers of this Markdown file")
    args = ap.parse_args(argv)
    if args.reps < 3 or args.model_reps < 3 or args.calibration_images < 1 or args.threads < 1:
        ap.error(f"--reps and --model-reps must be >= 3, --calibration-images and --threads >= 1; got {args.reps}, "
                 f"{args.model_reps}, {args.calibration_images}, {args.threads}")
    torch.set_num_threads(args.threads)
    text = report(args, argv)
    print(text)
    if args.out:
        write_between_markers(args.out, text)
        print(f"wrote {args.out}")
    return text


if __name__ == "__main__":
    main()
