"""Two builds of the kernel core, timed against each other: runs bench_core of each build in turn, several rounds,
and prints per kernel family and layer the median conv and pack times of each and their ratio (new / old).

    python tools/compare_bench_core.py OLD/bench_core NEW/bench_core [--rounds 7] [-- bench_core arguments]

Alternating processes rather than one process (two builds of the same core cannot share one), so that load changes
on a shared machine fall on both builds alike; the ratio of medians is the figure to read. Build the old one from a
worktree of the old revision: `git worktree add /tmp/old REV && cmake -S /tmp/old -B /tmp/old/build -G Ninja
-DCMAKE_BUILD_TYPE=Release && cmake --build /tmp/old/build --target bench_core`.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.machine import cpu_model  # noqa: E402

ROW = re.compile(r"^(\S+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+\d+%$")
FAMILY = re.compile(r"^\[(\w+)\] peak probe")


def run(binary, args):
    """{(family, layer): (pack ms, conv ms)} of one bench_core run."""
    out = subprocess.run([binary, *args], check=True, capture_output=True, text=True).stdout
    rows, family = {}, None
    for line in out.splitlines():
        if m := FAMILY.match(line):
            family = m.group(1)
        elif (m := ROW.match(line)) and family:
            rows[(family, m.group(1))] = (float(m.group(2)), float(m.group(3)))
    if not rows:
        raise SystemExit(f"{binary} printed no layer rows:\n{out}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=7)
    argv = sys.argv[1:]
    # Everything after "--" goes to bench_core.
    split = argv.index("--") if "--" in argv else len(argv)
    args = ap.parse_args(argv[:split])
    bench_args = argv[split + 1:]
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    times = {"old": [], "new": []}
    for r in range(args.rounds):
        # Alternate which build goes first, so neither always runs after the other.
        order = ("old", "new") if r % 2 == 0 else ("new", "old")
        for name in order:
            times[name].append(run(getattr(args, name), bench_args))
    print(f"# bench_core, old {args.old} against new {args.new}; {args.rounds} rounds, alternating")
    print(f"# CPU: {cpu_model()}; {os.cpu_count()} logical CPUs; load average at end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"# command: python tools/compare_bench_core.py {args.old} {args.new} --rounds {args.rounds} -- "
          f"{' '.join(bench_args)}")
    print("| family | layer | conv ms old | conv ms new | new / old | pack ms old | pack ms new | new / old |")
    print("|---|---|---|---|---|---|---|---|")
    ratios, pack_ratios = {}, {}
    for key in times["old"][0]:
        if not all(key in t for t in times["old"] + times["new"]):
            continue
        med = {name: [statistics.median(t[key][k] for t in times[name]) for k in (0, 1)] for name in times}
        conv = med["new"][1] / med["old"][1]
        pack = med["new"][0] / med["old"][0]
        ratios.setdefault(key[0], []).append(conv)
        pack_ratios.setdefault(key[0], []).append(pack)
        print(f"| {key[0]} | {key[1]} | {med['old'][1]:.4f} | {med['new'][1]:.4f} | {conv:.3f} | "
              f"{med['old'][0]:.4f} | {med['new'][0]:.4f} | {pack:.3f} |")
    # The pack pass is the same code in most comparisons: its ratio shows how far the run itself favoured one build.
    for family, r in ratios.items():
        print(f"# {family}: conv new / old, geometric mean over {len(r)} layers: "
              f"{statistics.geometric_mean(r):.3f} (range {min(r):.3f}-{max(r):.3f}); "
              f"pack new / old {statistics.geometric_mean(pack_ratios[family]):.3f}")


if __name__ == "__main__":
    main()
