"""The AVX2 family's partial strips with the call's fixed steps: before/after table from raw/avx2-partial-strips.

Each raw file is one `bench_core --backend avx2 --unit` process; its own per-vector column (the same code before
and after) is the in-process control, so the figure compared is fixed-steps time over per-vector time.
Usage: python docs/perf/output-steps/partial_strips.py
"""
import pathlib
import statistics

RAW = pathlib.Path(__file__).parent / "raw" / "avx2-partial-strips"


def ratios(path):
    """layer -> (conv ms, conv ms over the per-vector path's) of one bench_core run."""
    out = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields and fields[0].count(",") == 5:
            out[fields[0]] = (float(fields[2]), float(fields[2]) / float(fields[-1]))
    return out


def main():
    before = [ratios(p) for p in sorted(RAW.glob("before-*.txt"))]
    after = [ratios(p) for p in sorted(RAW.glob("after-*.txt"))]
    print("| layer (cin,cout,hw,k,s,p) | conv ms before | after | fixed / per-vector before | after |")
    print("|---|---:|---:|---:|---:|")
    for layer in before[0]:
        cells = [statistics.median(run[layer][i] for run in side) for i in (0, 1) for side in (before, after)]
        print(f"| {layer} | {cells[0]:.4f} | {cells[1]:.4f} | {cells[2]:.2f} | {cells[3]:.2f} |")


if __name__ == "__main__":
    main()
