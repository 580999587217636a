"""Frozen binarized resnet18 and Bi-Real-Net-18 in each fixed layout, interleaved, with each layout's per-operator
times; and the layout freeze(memory_format="auto") picks in four builds. 1 thread, batch 1, 224x224.

    PYTHONPATH=. python docs/perf/nhwc-walk/layouts.py
"""
import statistics
import time
import warnings

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

import models
import xnorconv

warnings.simplefilter("ignore")
torch.set_num_threads(1)
x = torch.randn(1, 3, 224, 224)
nets = {"resnet18_binary": xnorconv.binarize(torchvision.models.resnet18(), learnable_threshold=True).eval(),
        "birealnet18": models.create("birealnet18", 1000).eval()}
with torch.no_grad():
    for name, binary in nets.items():
        frozen = {"NCHW": xnorconv.freeze(binary, memory_format=torch.contiguous_format),
                  "channels_last": xnorconv.freeze(binary, memory_format=torch.channels_last)}
        picks = []
        for _ in range(4):
            auto = xnorconv.freeze(binary)
            auto(x)
            picks.append(str(xnorconv.frozen_memory_format(auto)).removeprefix("torch."))
        times = {k: [] for k in frozen}
        for _ in range(15):
            for k, m in frozen.items():
                m(x)
                start = time.perf_counter()
                m(x)
                m(x)
                times[k].append((time.perf_counter() - start) / 2 * 1e3)
        print(f"{name}: median ms per image " + ", ".join(f"{k} {statistics.median(v):.3f}" for k, v in times.items())
              + f"; auto picked {picks}")
        for k, m in frozen.items():
            with profile(activities=[ProfilerActivity.CPU]) as p:
                for _ in range(10):
                    m(x)
            top = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:3]
            print(f"  {k}: " + ", ".join(f"{e.key} x{e.count // 10} {e.self_cpu_time_total / 10e3:.3f} ms" for e in top))
