#!/usr/bin/env python3
"""Static throughput of the NEON inner loop: compiles csrc/core/kernel_neon.cpp for aarch64 exactly as the builds do
(-O3, no -march/-mcpu), finds the convolution's innermost loop in the assembly (the loop holding the most `cnt`
instructions that loads from memory, i.e. not the register-only peak probe), runs llvm-mca on it, and prints binary
MACs per cycle = (cnt instructions x 128 bits) / cycles per iteration. Also runs the same for a block of FMLA.4s as
the fp32 baseline. Emulated (qemu) timings are never used: this is the documented count.

    python3 tools/neon_mca.py [--cpu cortex-a72] [--cxx aarch64-linux-gnu-g++] [--show-loop]

Needs: g++-aarch64-linux-gnu (or a native aarch64 g++: pass --cxx g++), llvm (llvm-mca).
"""
import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABEL = re.compile(r"^(\.L\w+):")
BRANCH = re.compile(r"^\s+(b|b\.\w+|b\w\w|cbn?z|tbn?z)\s+.*?(\.L\w+)\s*$")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw).stdout


def loops(asm_lines):
    """Yields (label, body lines) for every innermost loop (a backward branch to a label with no other label in
    between): the instructions from the label up to and including the branch (directives dropped)."""
    where = {}
    for i, line in enumerate(asm_lines):
        m = LABEL.match(line)
        if m:
            where[m.group(1)] = i
        b = BRANCH.match(line)
        if b and b.group(2) in where:
            start = where[b.group(2)]
            if any(LABEL.match(l) for l in asm_lines[start + 1:i]):
                continue  # an outer loop or a loop with internal control flow
            body = [l.split("//")[0].rstrip() for l in asm_lines[start + 1:i + 1]]
            body = [l for l in body if l.strip() and not l.strip().startswith(".") and not LABEL.match(l)]
            yield b.group(2), body


def mca(body, cpu, iterations=1000):
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(body) + "\n")
        path = f.name
    try:
        out = run(["llvm-mca", "-mtriple=aarch64", f"-mcpu={cpu}", f"-iterations={iterations}", path])
    finally:
        os.unlink(path)
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", out).group(1))
    rthroughput = float(re.search(r"Block RThroughput:\s+([\d.]+)", out).group(1))
    return cycles / iterations, rthroughput, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="append", help="llvm-mca -mcpu (repeatable); default cortex-a72")
    ap.add_argument("--cxx", default="aarch64-linux-gnu-g++")
    ap.add_argument("--show-loop", action="store_true", help="print the loop and llvm-mca's full report")
    args = ap.parse_args()
    cpus = args.cpu or ["cortex-a72"]

    with tempfile.TemporaryDirectory() as tmp:
        asm_path = os.path.join(tmp, "kernel_neon.s")
        run([args.cxx, "-std=c++17", "-O3", "-DNDEBUG", "-I", os.path.join(ROOT, "csrc", "core"), "-S",
             os.path.join(ROOT, "csrc", "core", "kernel_neon.cpp"), "-o", asm_path])
        asm = open(asm_path).read().splitlines()

    def count(body, mnemonic):
        return sum(1 for l in body if l.split() and l.split()[0] == mnemonic)

    candidates = [(count(b, "cnt"), label, b) for label, b in loops(asm)
                  if any(l.split()[0].startswith(("ld", "ldr", "ldp")) for l in b if l.split())]
    if not candidates or max(candidates)[0] == 0:
        sys.exit("neon_mca.py: no loop with cnt and loads found (is this the NEON kernel for aarch64?)")
    products, label, body = max(candidates, key=lambda c: c[0])
    compiler = run([args.cxx, "--version"]).splitlines()[0]
    mca_version = next(l.strip() for l in run(["llvm-mca", "--version"]).splitlines() if "version" in l)
    print(f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; compiler: {compiler}; {mca_version}")
    print(f"command: python3 tools/neon_mca.py " + " ".join(f"--cpu {c}" for c in cpus))
    mnemonics = {}
    for l in body:
        mnemonics[l.split()[0]] = mnemonics.get(l.split()[0], 0) + 1
    print(f"inner loop {label}: {len(body)} instructions: " +
          ", ".join(f"{n} {m}" for m, n in sorted(mnemonics.items(), key=lambda kv: -kv[1])))
    print(f"products per iteration: {products} (cnt of 128 bits) = {products * 128} binary MACs")
    fmla = [f"fmla v{i}.4s, v{24 + i % 4}.4s, v{28 + i // 4}.4s" for i in range(16)]
    for cpu in cpus:
        cycles, rt, report = mca(body, cpu)
        f_cycles, _, _ = mca(fmla, cpu)
        fma_per_cycle = 16 * 4 / f_cycles
        print(f"[{cpu}] {cycles:.2f} cycles/iteration (block reciprocal throughput {rt}) -> "
              f"{products * 128 / cycles:.1f} binary MACs/cycle; fp32 baseline {fma_per_cycle:.2f} FMAs/cycle "
              f"(16 independent fmla.4s) -> ratio {products * 128 / cycles / fma_per_cycle:.1f}x")
        if args.show_loop:
            print("\n".join(body))
            print(report)


if __name__ == "__main__":
    main()
