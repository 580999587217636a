"""Before/after tables of alternating bench_core processes: docs/perf/output-steps/raw/<dir>/<prefix>-{before,after}-N.txt.

Each raw file is one `bench_core` process. Printed per layer: the median convolution pass before and after, the
median of the per-round ratios (after / before of the same round) and, for `--unit` runs, each side's convolution
pass over its own per-vector column (an in-process control where the per-vector path is the same code on both sides).
Usage: python docs/perf/output-steps/before_after.py avx2-partial-strips ""
       python docs/perf/output-steps/before_after.py local-params avx512
"""
import pathlib
import statistics
import sys

RAW = pathlib.Path(__file__).parent / "raw"


def layers(path):
    """layer -> (conv ms, per-vector conv ms or None without --unit) of one bench_core run."""
    out = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields and fields[0].count(",") == 5:
            out[fields[0]] = (float(fields[2]), None if fields[-1].endswith("%") else float(fields[-1]))
    return out


def runs(directory, prefix, side):
    stem = f"{prefix}-{side}" if prefix else side
    paths = sorted(directory.glob(f"{stem}-*.txt"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return [layers(p) for p in paths]


def main(directory, prefix):
    before, after = runs(RAW / directory, prefix, "before"), runs(RAW / directory, prefix, "after")
    print(f"{len(before)} processes before, {len(after)} after, alternating")
    print("| layer (cin,cout,hw,k,s,p) | conv ms before | after | after / before (median of rounds) "
          "| conv / per-vector before | after |")
    print("|---|---:|---:|---:|---:|---:|")
    for layer in before[0]:
        conv = [statistics.median(run[layer][0] for run in side) for side in (before, after)]
        rounds = statistics.median(a[layer][0] / b[layer][0] for b, a in zip(before, after))
        if before[0][layer][1] is None:
            control = ["-", "-"]
        else:
            control = [f"{statistics.median(run[layer][0] / run[layer][1] for run in side):.2f}" for side in (before, after)]
        print(f"| {layer} | {conv[0]:.4f} | {conv[1]:.4f} | {rounds:.2f} | {control[0]} | {control[1]} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
