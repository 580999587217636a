"""Medians of raw/fixed-vs-per-vector.txt: each layer's convolution pass (with the unit's shortcut and PReLU) with
the call's fixed steps and with the per-vector path (OutputStage::per_vector_steps), timed interleaved by
bench_core --unit. Usage: python docs/perf/output-steps/fixed_steps.py [raw/fixed-vs-per-vector.txt]"""
import collections
import os
import statistics
import sys

path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "raw", "fixed-vs-per-vector.txt")
runs = collections.defaultdict(lambda: ([], []))
for line in open(path):
    if line.startswith("#"):
        continue
    # pass R family layout layer pack_ms conv_ms GMAC/s of_peak per_vector_conv_ms
    fields = line.split()
    fixed, per_vector = runs[(fields[2], fields[3], fields[4])]
    fixed.append(float(fields[6]))
    per_vector.append(float(fields[9]))
print("| family | layout | layer | conv ms, fixed steps | steps tested per vector | fixed / per vector |")
print("|---|---|---|---:|---:|---:|")
for (family, layout, layer), (fixed, per_vector) in runs.items():
    a, b = statistics.median(fixed), statistics.median(per_vector)
    print(f"| {family} | {layout.upper()} | {layer} | {a:.4f} | {b:.4f} | {a / b:.2f} |")
