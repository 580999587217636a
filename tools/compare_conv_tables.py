"""Two sets of model-suite runs compared layer by layer: the per-convolution table that `python -m bench --models
... --out DIR` writes (each binary convolution timed in place, with the tensors it gets in a forward pass), read from
each run's DIR/bench.json, as medians over the runs of each set and their ratio (after / before).

    python tools/compare_conv_tables.py "BEFORE_DIRS_GLOB" "AFTER_DIRS_GLOB" [--model binary_dnet53] [--out FILE.md]

Each glob names run directories (quote it, so that the shell leaves it to this script), e.g.
"runs/before-*" "runs/after-*". Run the two sets in alternating processes (before, after, before, ...), so that
load changes on a shared machine fall on both alike; the ratio of medians is the figure to read.
"""
import argparse
import glob
import json
import os
import statistics
import sys


def conv_rows(run_dir, model):
    """The binary convolutions of `model` in one run, in network order."""
    with open(os.path.join(run_dir, "bench.json")) as f:
        models = json.load(f)["models"]
    rows = models.get("binary_convs") or []
    if not rows:
        raise SystemExit(f"{run_dir}/bench.json has no per-convolution table (run `python -m bench --models` with "
                         f"a frozen binary model first and its float twin)")
    measured = models["breakdown"]["model"]  # the table is of the run's first model
    if measured != model:
        raise SystemExit(f"{run_dir}/bench.json has the convolutions of {measured}, not {model} (see --model)")
    return rows


def runs_of(pattern, model):
    dirs = sorted(d for d in glob.glob(pattern) if os.path.isfile(os.path.join(d, "bench.json")))
    if not dirs:
        raise SystemExit(f"no run directory with a bench.json matches {pattern!r}")
    return [conv_rows(d, model) for d in dirs]


def shape(row):
    (kh, kw), (sh, _) = row["kernel"], row["stride"]
    return f"{row['in_channels']}->{row['out_channels']} {kh}x{kw}/{sh}"


def table(before, after):
    names = [row["name"] for row in before[0]]
    for runs, label in ((before, "before"), (after, "after")):
        if any([row["name"] for row in run] != names for run in runs):
            raise SystemExit(f"the {label} runs list other convolutions than the first before run")
    lines = ["| convolution | cin->cout k/s | input | before ms | after ms | after / before |",
             "|---|---:|---:|---:|---:|---:|"]
    total_before = total_after = 0.0
    for i, row in enumerate(before[0]):
        b = statistics.median(run[i]["binary_ms"] for run in before)
        a = statistics.median(run[i]["binary_ms"] for run in after)
        total_before, total_after = total_before + b, total_after + a
        extra = " +shortcut" if row.get("input_shortcut") else " +res" if row.get("residual") else ""
        h, w = row["in_hw"]
        lines.append(f"| {row['name']} | {shape(row)} | {h}x{w}{extra} | {b:.4f} | {a:.4f} | {a / b:.2f}x |")
    lines.append(f"| total ({len(names)}) |  |  | {total_before:.3f} | {total_after:.3f} | "
                 f"{total_after / total_before:.2f}x |")
    lines += ["", f"Medians over {len(before)} before and {len(after)} after runs of each convolution's binary ms "
              "(the op with its fused shortcut and PReLU, timed in place)."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", help="glob of the before runs' --out directories")
    ap.add_argument("after", help="glob of the after runs' --out directories")
    ap.add_argument("--model", default="binary_dnet53", help="the frozen model whose convolutions are compared")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args()
    text = table(runs_of(args.before, args.model), runs_of(args.after, args.model))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
