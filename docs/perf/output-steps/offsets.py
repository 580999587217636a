"""Medians of raw/unit-offset.txt: the convolution pass (ms) of each layer by the shortcut's offset from the output
modulo 4 KiB. Usage: python docs/perf/output-steps/offsets.py [raw/unit-offset.txt]"""
import collections
import os
import statistics
import sys

path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "raw", "unit-offset.txt")
conv_ms = collections.defaultdict(list)
for line in open(path):
    if line.startswith("#"):
        continue
    # pass R offset O layer pack_ms conv_ms GMAC/s of_peak
    fields = line.split()
    conv_ms[(fields[4], int(fields[3]))].append(float(fields[6]))
offsets = sorted({offset for _, offset in conv_ms})
print("| layer | " + " | ".join(f"{o} B" for o in offsets) + " |")
print("|---|" + "---:|" * len(offsets))
for layer in dict.fromkeys(layer for layer, _ in conv_ms):
    print(f"| {layer} | " + " | ".join(f"{statistics.median(conv_ms[(layer, o)]):.4f}" for o in offsets) + " |")
