"""The machine a figure is measured on, without importing torch: tools/ record it beside their runs too."""
import platform
import subprocess


def cpu_model() -> str:
    """The CPU's model name. /proc/cpuinfo names it on x86; on aarch64 it has no "model name" line and lscpu
    derives the name from the CPU's ID registers; elsewhere, whatever the platform module knows."""
    try:
        with open("/proc/cpuinfo") as f:
            fields = {}
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        if "model name" in fields:
            # A VM often reports a generic name ("Intel(R) Xeon(R) Processor"); family and model tell the generation.
            if "cpu family" in fields and "model" in fields:
                return f"{fields['model name']} (family {fields['cpu family']}, model {fields['model']})"
            return fields["model name"]
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
