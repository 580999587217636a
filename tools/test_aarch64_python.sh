#!/usr/bin/env bash
# Builds and tests the whole Python package on aarch64, on this x86 machine: an arm64 Debian userland (debootstrap)
# run through qemu-user's binfmt handler, torch's aarch64 wheel from PyPI, the extension built inside it as a user
# would build it, then
#   - the op, module and frozen-model tests (every CPU family the build has: neon and scalar; GPU tests skip),
#   - the first commands of a Raspberry Pi / Jetson user: python -m xnorconv, python -m bench (one quick layer),
#     and the C++ core build with build/bench_core (one quick shape).
# Emulated timings mean nothing: this checks that the code is correct and that the commands work.
#
#   bash tools/test_aarch64_python.sh
#
# Needs root, debootstrap, qemu-user-static and binfmt-support (Debian: apt-get install -y debootstrap
# qemu-user-static binfmt-support rsync). The userland is kept in $XNORCONV_ARM64_ROOT (default
# /var/cache/xnorconv/arm64-bookworm) and reused while it is complete: the first run takes about 25-35 minutes
# (debootstrap, the torch wheel installed under emulation, the extension built under emulation), a later one only
# what changed plus the tests. Delete the folder to start over.
#
# The emulated CPU is a Cortex-A76, the core of a Raspberry Pi 5 ($XNORCONV_ARM64_QEMU_CPU overrides it, e.g. max):
# qemu's default CPU has SVE, and there PyTorch's own float32 convolution (oneDNN's SVE kernels) returns wrong sums
# for some channel counts, which broke tests of BinaryConv2d's training path that compare it with float64 (see
# docs/arm.md). The host's /proc and /sys are deliberately not mounted in the chroot: with them, torch's cpuinfo
# reads the x86 host's CPU description and the process dies at import. The userland gets a static description of
# two such cores instead (/proc/cpuinfo, the CPU lists and MIDR in /sys), without which cpuinfo fails to initialise.
set -euo pipefail
cd "$(dirname "$0")/.."

root=${XNORCONV_ARM64_ROOT:-/var/cache/xnorconv/arm64-bookworm}
suite=bookworm
qemu_cpu=${XNORCONV_ARM64_QEMU_CPU:-cortex-a76}
# The packages of the userland, and what its venv installs: a change to either rebuilds that part.
base_packages=python3,python3-venv,python3-pip,python3-dev,g++,cmake,ninja-build
extra_packages="ccache"  # added to an existing userland without a new debootstrap
pip_packages="torch==2.14.1 torchvision==0.29.1 numpy ninja pytest pytest-xdist expecttest hypothesis tqdm matplotlib"

say() { echo "== aarch64 python: $*"; }
die() { echo "test_aarch64_python.sh: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot)"
for tool in debootstrap chroot rsync update-binfmts; do
  command -v "$tool" >/dev/null || die "'$tool' not found (see the header of this script)"
done

# The kernel runs aarch64 binaries through qemu when binfmt_misc has the handler; qemu-user-static registers it
# with the F flag (the interpreter is opened at registration), so the chroot needs no copy of qemu.
if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || die "cannot mount binfmt_misc"
fi
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null ||
  die "no enabled qemu-aarch64 binfmt handler (install qemu-user-static and binfmt-support)"

# Debian's own mirror, as this machine's apt is configured: the first URI of a deb822 source or of a sources.list
# line that is not a security or updates pocket.
debian_mirror() {
  local uri
  uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n 1)
  [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
                         awk '{print $2}' | grep -v security | grep -i debian | head -n 1)
  echo "$uri"
}

stamp_base="$root/.xnorconv-base-$(echo "$suite $base_packages" | sha1sum | cut -c1-12)"
if [ ! -e "$stamp_base" ]; then
  mirror=$(debian_mirror)
  [ -n "$mirror" ] || die "no Debian mirror found in apt's sources"
  say "creating the arm64 $suite userland in $root (first run: debootstrap)"
  rm -rf "$root"
  mkdir -p "$(dirname "$root")"
  debootstrap --arch=arm64 --variant=minbase --include="$base_packages" "$suite" "$root" "$mirror" >/dev/null
  touch "$stamp_base"
fi
# Name resolution, certificates and pip's settings as on the host (refreshed: they may change between runs).
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"

# What /proc and /sys would say of two Cortex-A76 cores (MIDR 0x414fd0b1), for torch's cpuinfo.
mkdir -p "$root/proc" "$root/sys/devices/system/cpu"
for cpu in 0 1; do
  printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp %s\n' \
    "$cpu" "asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
  printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\nCPU part\t: 0xd0b\nCPU revision\t: 1\n\n'
  mkdir -p "$root/sys/devices/system/cpu/cpu$cpu/regs/identification"
  echo 0x00000000414fd0b1 >"$root/sys/devices/system/cpu/cpu$cpu/regs/identification/midr_el1"
done >"$root/proc/cpuinfo"
echo 0-1 >"$root/sys/devices/system/cpu/possible"
echo 0-1 >"$root/sys/devices/system/cpu/present"

# Runs a command inside the userland with a clean environment: the host's PIP_*, VIRTUAL_ENV or PYTHONPATH would
# point at x86 paths.
# ccache's compiler links come first on PATH: pip builds the extension in a new temporary folder each time, so
# without it every run would compile everything again under emulation.
in_arm() {
  env -i HOME=/root PATH=/usr/lib/ccache:/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 CCACHE_DIR=/var/cache/ccache DEBIAN_FRONTEND=noninteractive QEMU_CPU="$qemu_cpu" \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 XNORCONV_CUDA=0 OMP_NUM_THREADS=2 \
    chroot "$root" /bin/bash -c "$1"
}

for package in $extra_packages; do
  in_arm "dpkg -s $package >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq $package >/dev/null)"
done

# The venv's packages are installed by the host's pip into the userland's site-packages (--target with aarch64
# platform tags): the same wheels pip inside the userland would pick, at native speed instead of under emulation
# (there, hashing and unpacking torch's wheel and its CUDA libraries takes most of an hour).
stamp_venv="$root/.xnorconv-venv-$(echo "$pip_packages" | sha1sum | cut -c1-12)"
if [ ! -e "$stamp_venv" ]; then
  say "installing $pip_packages for aarch64 into the userland's venv"
  in_arm "rm -rf /opt/venv && python3 -m venv /opt/venv"
  pyver=$(in_arm "python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'")
  site="$root/opt/venv/lib/python$pyver/site-packages"
  platforms=(--platform linux_aarch64 --platform manylinux2014_aarch64)
  glibc=$(in_arm "getconf GNU_LIBC_VERSION" | sed 's/.*\.//')  # no wheel that needs a newer glibc
  for minor in $(seq 17 "$glibc"); do platforms+=(--platform "manylinux_2_${minor}_aarch64"); done
  # shellcheck disable=SC2086
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-warn-script-location --no-warn-conflicts --upgrade \
    --target "$site" \
    "${platforms[@]}" --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" --only-binary=:all: \
    $pip_packages
  touch "$stamp_venv"
fi

# The working tree without what git ignores (build output, the x86 venv) and without .git. rsync compares
# contents, so a file that did not change keeps its old time stamp and ninja rebuilds only what changed since the
# last run; the userland's own build output is ignored, hence kept.
say "copying the source tree into $root/src"
mkdir -p "$root/src"
rsync -a --checksum --delete --exclude=/.git --filter=':- .gitignore' ./ "$root/src/"

say "building the extension inside the userland (pip install -e ., as a user on a Pi would)"
t0=$(date +%s)
in_arm "cd /src && pip install -q --no-build-isolation -e . && python -m xnorconv"
say "build took $(($(date +%s) - t0)) s"

# One pytest worker per core: each is its own emulated process, so the tests take about half the time. Without
# test_nn.py's torch.compile tests: Inductor compiles C++ under emulation for many minutes (they run on x86).
say "pytest: ops, module and frozen-model tests on every family of this build"
t0=$(date +%s)
in_arm "cd /src && python -m pytest -q -p no:cacheprovider -n $(nproc) tests/test_ops.py tests/test_nn.py tests/test_training_ops.py \
  tests/test_batch_norm_add_prelu.py tests/test_network_ops.py tests/test_stem.py \
  tests/test_models.py -k '(not test_models.py or frozen or fast_forward or folded) and not test_torch_compile_'"
say "pytest took $(($(date +%s) - t0)) s"

say "a Pi user's first commands: python -m bench (one quick layer) and build/bench_core (one quick shape)"
in_arm "cd /src && python -m bench --shape 64,64,16,3,1,1 --reps 3 --no-openvino"
in_arm "cd /src && cmake -S . -B build/native -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null && \
  cmake --build build/native --target bench_core && build/native/bench_core --reps 2 --shape 64,64,16,3,1,1"
say "all passed"
