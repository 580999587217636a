"""Per-layer medians over the before/after runs in raw/: each binary convolution's time over the memory passes of its
tensors (the last column of `python -m bench --models`'s layer table, measured interleaved in each process), and the
frozen-over-fp32 speedups. Usage: python docs/perf/output-steps/layers.py MODEL [DIR] (MODEL: binary_dnet53,
reference-nets; DIR: a folder of raw/ holding the runs, raw/ itself by default)"""
import collections
import glob
import os
import re
import statistics
import sys

model = sys.argv[1] if len(sys.argv) > 1 else "binary_dnet53"
here = os.path.join(os.path.dirname(__file__), "raw", *sys.argv[2:3])
over_memory = collections.defaultdict(list)  # (network, layer, side) -> binary / memory
speedups = collections.defaultdict(list)     # (comparison, side) -> x
for path in sorted(glob.glob(os.path.join(here, f"{model}-*-*.md"))):
    side = "before" if "-before-" in path else "after"
    network = None
    for line in open(path):
        heading = re.match(r"Each binary convolution of (\S+) in place", line)
        if heading:
            network = heading.group(1)
            continue
        speedup = re.match(r"- frozen (\S+) vs (\S+), both (eager|torchscript): batch 1 ([0-9.]+)x", line)
        if speedup:
            speedups[(f"{speedup.group(1)} vs {speedup.group(2)}, {speedup.group(3)}", side)].append(
                float(speedup.group(4)))
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if network and line.startswith("| ") and len(cells) == 8 and not cells[0].startswith("binary conv"):
            label = cells[0] if cells[0].startswith("total") else f"{cells[0]} {cells[1]}"
            over_memory[(network, label, side)].append(float(cells[-1]))
            if cells[0].startswith("total"):
                network = None

print("| network | layer | binary / memory before | after | after / before |")
print("|---|---|---:|---:|---:|")
for network, label in dict.fromkeys((n, l) for n, l, _ in over_memory):
    before = statistics.median(over_memory[(network, label, "before")])
    after = statistics.median(over_memory[(network, label, "after")])
    print(f"| {network} | {label} | {before:.2f} | {after:.2f} | {after / before:.2f} |")
print()
print("| frozen vs fp32, batch 1 | before (each run) | after (each run) |")
print("|---|---|---|")
for comparison in dict.fromkeys(c for c, _ in speedups):
    cells = [" ".join(f"{x:.2f}x" for x in speedups[(comparison, side)]) for side in ("before", "after")]
    print(f"| {comparison} | {cells[0]} | {cells[1]} |")
