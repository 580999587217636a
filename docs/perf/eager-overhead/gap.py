"""Each frozen network's eager pass beside its TorchScript pass (torch.jit.trace + torch.jit.freeze, no Python in
the graph), interleaved in one process, 1 thread, batch 1: the difference is what eager mode costs around the
kernels (Python and the module calls, and the kernels running after Python code instead of one after another).

    PYTHONPATH=. python docs/perf/eager-overhead/gap.py [--rounds 200]
"""
import argparse
import statistics
import time
import warnings

import torch
import torchvision

import models
import xnorconv

NETWORKS = {  # name: (builder, input size)
    "resnet18_binary": (lambda: xnorconv.binarize(torchvision.models.resnet18(), learnable_threshold=True), 224),
    "birealnet18": (lambda: models.create("birealnet18", 1000), 224),
    "reactnet_a": (lambda: models.create("reactnet_a", 1000), 224),
    "binary_dnet53": (lambda: models.create("binary_dnet53", 2), 128),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for name, (build, size) in NETWORKS.items():
        model = xnorconv.freeze(build().eval())
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            model(x)
            scripted = torch.jit.freeze(torch.jit.trace(model, x, check_trace=False))
            times = {"eager": [], "torchscript": []}
            for _ in range(args.rounds):
                for mode, run in (("eager", model), ("torchscript", scripted)):
                    start = time.perf_counter()
                    run(x)
                    times[mode].append(time.perf_counter() - start)
        eager, script = (statistics.median(times[m]) * 1e3 for m in ("eager", "torchscript"))
        print(f"{name} at {size}: eager {eager:.3f} ms, TorchScript {script:.3f} ms, eager - TorchScript "
              f"{eager - script:.3f} ms ({(eager - script) / eager:.0%} of the eager pass)")


if __name__ == "__main__":
    main()
