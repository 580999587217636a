"""The int8 stem's output stage before and after, interleaved in one process (1 thread, batch 1, medians):

  before  PyTorch's quantized max pool, dequantize and layout copy after the int8 convolution (Int8Conv2d without
          xnorconv::dequantize_max_pool2d);
  after   xnorconv::dequantize_max_pool2d: the pool on the 8-bit levels, the dequantization and the caller's NCHW
          layout in one pass.

For the stem alone and for whole frozen networks with first_layer="int8" (binarized torchvision resnet18,
Bi-Real-Net-18 and ReActNet-A at 224x224, 1000 classes), eager and TorchScript (traced with each output stage).

    PYTHONPATH=. python docs/perf/int8-stem-output/ab.py [--rounds 60]
"""
import argparse
import contextlib
import warnings

import torch
import torchvision

import models
import xnorconv
from bench.timing import environment, interleaved, median_ms
from xnorconv._first_layer import Int8Conv2d

NETWORKS = {
    "binarized resnet18": lambda: xnorconv.binarize(torchvision.models.resnet18(num_classes=1000),
                                                    learnable_threshold=True),
    "Bi-Real-Net-18": lambda: models.create("birealnet18", 1000),
    "ReActNet-A": lambda: models.create("reactnet_a", 1000),
}
ONE_PASS = Int8Conv2d._one_pass_pool


@contextlib.contextmanager
def output_stage(one_pass: bool):
    Int8Conv2d._one_pass_pool = ONE_PASS if one_pass else (lambda self, channels_last: None)
    try:
        yield
    finally:
        Int8Conv2d._one_pass_pool = ONE_PASS


def switched(fn, one_pass: bool):
    def call():
        with output_stage(one_pass):
            fn()
    return call


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    env = environment(1, argv=["docs/perf/int8-stem-output/ab.py"])
    print(f"{env['machine']} ({env['cpu_features']}); torch {env['torch']}; {env['date']}")
    x = torch.randn(1, 3, 224, 224)
    calibration = torch.randn(8, 3, 224, 224)
    print("network | stem before | stem after | eager before | eager after | TorchScript before | TorchScript after "
          "(ms)")
    for name, build in NETWORKS.items():
        model = xnorconv.freeze(build().eval(), first_layer="int8", calibration=calibration)
        stem = next(m for m in model.modules() if isinstance(m, Int8Conv2d))
        with torch.no_grad():
            model(x)
            stem_input = []
            handle = stem.register_forward_pre_hook(lambda m, a: stem_input.append(a[0]))
            model(x)
            handle.remove()
            scripted = {}
            for one_pass in (False, True):
                with output_stage(one_pass):
                    scripted[one_pass] = torch.jit.freeze(torch.jit.trace(model, x, check_trace=False))
            fns = {}
            for one_pass, label in ((False, "before"), (True, "after")):
                fns[f"stem {label}"] = switched(lambda: stem(stem_input[0]), one_pass)
                fns[f"eager {label}"] = switched(lambda: model(x), one_pass)
                fns[f"TorchScript {label}"] = lambda s=scripted[one_pass]: s(x)
            times = interleaved(fns, args.rounds)
        ms = {k: median_ms(v) for k, v in times.items()}
        print(f"{name} | " + " | ".join(f"{ms[k]:.3f}" for k in (
            "stem before", "stem after", "eager before", "eager after", "TorchScript before", "TorchScript after")))


if __name__ == "__main__":
    main()
