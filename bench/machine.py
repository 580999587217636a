"""The machine a figure is measured on, without importing torch: tools/ record it beside their runs too."""
import platform
import subprocess


def cpu_model() -> str:
    """The CPU's model name. /proc/cpuinfo names it on x86; on aarch64 it has no "model name" line and lscpu
    derives the name from the CPU's ID registers; elsewhere, whatever the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        lscpu = ""
    for line in lscpu.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"
