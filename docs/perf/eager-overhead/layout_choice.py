"""Does freeze's "auto" layout pick the faster layout for binarized resnet18? One build per process: the layout it
chose on the first call, its stem's choices, then the frozen model as chosen ("auto") and frozen in each fixed
layout, timed interleaved (1 thread, batch 1, 224x224, median of 15 rounds, ms). Run it in several processes:

    for i in $(seq 1 20); do PYTHONPATH=. python docs/perf/eager-overhead/layout_choice.py $i; done
"""
import statistics
import sys
import time

import torch
import torchvision

import xnorconv


def main():
    torch.set_num_threads(1)
    torch.manual_seed(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    binary = xnorconv.binarize(torchvision.models.resnet18(num_classes=1000), learnable_threshold=True).eval()
    x = torch.randn(1, 3, 224, 224)
    auto = xnorconv.freeze(binary)
    with torch.no_grad():
        auto(x)
    models = {"auto": auto, "nchw": xnorconv.freeze(binary, memory_format=torch.contiguous_format),
              "channels_last": xnorconv.freeze(binary, memory_format=torch.channels_last)}
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(x)
            model(x)
        for _ in range(15):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    chosen = str(xnorconv.frozen_memory_format(auto)).removeprefix("torch.")
    print(f"chose {chosen} (stem: xnorconv's kernel for NCHW {auto.conv1.direct}, for channels_last "
          f"{auto.conv1.direct_channels_last}); " + ", ".join(
              f"{name} {statistics.median(t) * 1e3:.2f}" for name, t in times.items()))


if __name__ == "__main__":
    main()
