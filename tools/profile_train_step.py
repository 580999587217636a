#!/usr/bin/env python3
"""Where one training step of a model goes (forward, cross-entropy, backward, AdamW step), measured with
torch.profiler, for several models, input sizes and thread counts, optionally for an older revision beside this
tree.

Each configuration runs in a fresh process (in the tree of the revision it measures): a random batch of
`--batch` images, two untimed warm-up steps, `--steps` timed steps (wall and process CPU time; median) and then
`--profiled` steps under torch.profiler. The profile is split by phase:

  forward   each top-level op or autograd.Function called by the model's forward (aten::batch_norm,
            aten::prelu, _PackedSTEConv, ...), inclusive of the ops it calls;
  backward  each autograd node the engine evaluates (NativeBatchNormBackward0, _PackedSTEConvBackward, ...),
            inclusive;
  optimizer Optimizer.step and zero_grad.

Shares are of the profiled steps' total; the profiler's own overhead makes them a little larger than the
unprofiled step times printed beside them. Variants are interleaved round by round (`--rounds`), so that a busy
machine slows them alike; the step time is the median over rounds.

    python tools/profile_train_step.py [--models binary_dnet53 binary_dnet53_bwn binary_dnet53_float]
        [--sizes 64 128] [--batch 32] [--threads 1 2] [--old-rev REV] [--top 12] [--rounds 1]
        [--layouts nchw channels_last] [--env - OMP_WAIT_POLICY=PASSIVE] [--inside _PackedSTEConvBackward]

--old-rev REV also measures REV's Python sources (train/, models/, xnorconv/ from `git archive`, with this
tree's compiled extension), as tools/train_throughput.py does. Run it from the repository root.
"""
import argparse
import datetime
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
from bench.machine import cpu_model  # noqa: E402
from train_throughput import git, old_tree  # noqa: E402

CHILD = r'''
import json, sys, time, statistics
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
import models
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
torch.manual_seed(0)
x = torch.randn(a["batch"], 3, a["size"], a["size"])
y = torch.randint(0, 2, (a["batch"],))
model = models.create(a["model"], num_classes=2).train()
if a["channels_last"]:
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

def step():
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

for _ in range(2):
    step()
wall, cpu = [], []
for _ in range(a["steps"]):
    t, c = time.perf_counter(), time.process_time()
    step()
    wall.append(time.perf_counter() - t)
    cpu.append(time.process_time() - c)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(a["profiled"]):
        step()
BACKWARD = "autograd::engine::evaluate_function: "
groups = {}
def add(key, us):
    groups[key] = groups.get(key, 0.0) + us
def walk(event, in_op):
    name = event.name
    if name.startswith(BACKWARD):
        add(("backward", name[len(BACKWARD):]), event.cpu_time_total)
        return
    if name.startswith("Optimizer.") or name.startswith("Optimizer.zero_grad"):
        add(("optimizer", name.split("#")[-1]), event.cpu_time_total)
        return
    if name.startswith("autograd::engine") or name.startswith("ProfilerStep"):
        for child in event.cpu_children:
            walk(child, False)
        return
    if not in_op:
        add(("forward", name), event.cpu_time_total)
        return
for event in prof.events():
    if event.cpu_parent is None:
        walk(event, False)
inside = {}
for event in prof.events():  # the ops each named node calls directly (inclusive of what they call)
    if event.name in a["inside"]:
        for child in event.cpu_children:
            inside.setdefault(event.name, {})
            inside[event.name][child.name] = inside[event.name].get(child.name, 0.0) + child.cpu_time_total
total = sum(groups.values())
print(json.dumps({"wall": statistics.median(wall), "cpu": statistics.median(cpu), "profiled_us": total,
                  "steps_profiled": a["profiled"],
                  "groups": [[k[0], k[1], v] for k, v in sorted(groups.items(), key=lambda kv: -kv[1])],
                  "inside": {k: sorted(v.items(), key=lambda kv: -kv[1]) for k, v in inside.items()}}))
'''


def run(tree, spec, env):
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], cwd=tree,
                       env=dict(os.environ, PYTHONPATH=tree, **env), capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{tree} {spec} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["binary_dnet53", "binary_dnet53_bwn", "binary_dnet53_float"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after 2 warm-up steps)")
    ap.add_argument("--profiled", type=int, default=2, help="profiled steps per run")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--layouts", nargs="+", default=["nchw"], choices=["nchw", "channels_last"],
                    help="memory format of the model and the batch")
    ap.add_argument("--env", nargs="+", default=["-"], metavar="VAR=VALUE",
                    help="environment variants of every configuration ('-': the environment as it is), e.g. "
                         "OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--old-rev", default="", help="also profile this revision's Python sources")
    ap.add_argument("--top", type=int, default=12, help="rows per profile table (0: step times only)")
    ap.add_argument("--inside", nargs="*", default=[], metavar="NODE",
                    help="also list the ops these autograd.Function nodes call, e.g. _PackedSTEConvBackward")
    args = ap.parse_args()
    print(f"# training-step profile, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# CPU: {cpu_model()}; {os.cpu_count()} logical CPUs; load average at start "
          f"{', '.join(f'{v:.1f}' for v in os.getloadavg())}")
    dirty = git("status", "--porcelain", "train", "models", "xnorconv")
    print(f"# this tree: {git('rev-parse', '--short', 'HEAD')}{' + uncommitted changes' if dirty else ''}"
          + (f"; old: {git('rev-parse', '--short', args.old_rev)}" if args.old_rev else ""))
    print(f"# command: python {' '.join(sys.argv)}")
    work = tempfile.mkdtemp(prefix="profile_train_step_")
    try:
        trees = [("this tree", ROOT)]
        if args.old_rev:
            trees.insert(0, (f"old {git('rev-parse', '--short', args.old_rev)}", old_tree(args.old_rev,
                                                                                       os.path.join(work, "old"))))
        configs = [(label + ("" if env == "-" else f", {env}"), tree, model, size, threads, layout, env)
                   for size in args.sizes for threads in args.threads for model in args.models
                   for layout in args.layouts for label, tree in trees for env in args.env]
        results = {c: [] for c in configs}
        for _ in range(args.rounds):
            for c in configs:
                label, tree, model, size, threads, layout, env = c
                results[c].append(run(tree, {"model": model, "size": size, "threads": threads, "batch": args.batch,
                                             "steps": args.steps, "profiled": args.profiled,
                                             "channels_last": layout == "channels_last",
                                             "inside": [f"{n}" for n in args.inside]},
                                      dict([env.split("=", 1)]) if env != "-" else {}))
                if args.top == 0:  # step times as they come: a long comparison can be followed
                    r = results[c][-1]
                    print(f"# {label} {model} {size}x{size} {layout} {threads} thread(s): {r['wall'] * 1e3:.0f} ms "
                          f"wall, {r['cpu'] * 1e3:.0f} ms CPU per step; load {os.getloadavg()[0]:.1f}", flush=True)
        print(f"\nStep time (median of {args.steps} steps x {args.rounds} rounds; batch {args.batch}):\n")
        print("| code | model | input | layout | threads | wall ms/step | CPU ms/step | images/s (wall) |")
        print("|---|---|---|---|---|---|---|---|")
        for c in configs:
            label, _, model, size, threads, layout, _ = c
            wall = statistics.median(r["wall"] for r in results[c])
            cpu = statistics.median(r["cpu"] for r in results[c])
            print(f"| {label} | {model} | {size}x{size} | {layout} | {threads} | {wall * 1e3:.0f} | {cpu * 1e3:.0f} | "
                  f"{args.batch / wall:.1f} |")
        for c in configs if args.top else ():
            label, _, model, size, threads, layout, _ = c
            r = results[c][-1]
            total = r["profiled_us"]
            per_step = total / r["steps_profiled"] / 1e3
            print(f"\n{label}, {model}, {size}x{size}, {layout}, {threads} thread(s): {per_step:.0f} ms per profiled "
                  f"step (the last round)\n")
            print("| phase | op or autograd node | ms/step | share |")
            print("|---|---|---|---|")
            for phase, name, us in r["groups"][:args.top]:
                print(f"| {phase} | {name} | {us / r['steps_profiled'] / 1e3:.1f} | {100 * us / total:.1f}% |")
            rest = sum(us for _, _, us in r["groups"][args.top:])
            print(f"| | everything else | {rest / r['steps_profiled'] / 1e3:.1f} | {100 * rest / total:.1f}% |")
            for node, ops in r["inside"].items():
                node_total = sum(us for _, us in ops)
                print(f"\nInside {node} ({node_total / r['steps_profiled'] / 1e3:.1f} ms/step):\n")
                print("| op | ms/step | share of the node |")
                print("|---|---|---|")
                for op, us in ops[:args.top]:
                    print(f"| {op} | {us / r['steps_profiled'] / 1e3:.1f} | {100 * us / node_total:.1f}% |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
