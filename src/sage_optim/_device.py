"""What a measurement ran on, in words, for summaries and benchmark headers."""
from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_info() -> str:
    """The first processor's block of ``/proc/cpuinfo`` ("" where there is none, e.g. not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace").split("\n\n")[0]
    except OSError:
        return ""


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model with torch's thread count (``"AMD EPYC, 2 threads"``).

    Step times and tokens/s only compare within one machine; runs of one comparison are built over several
    sittings, which need not get the same CPU, so each run records this next to its numbers."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine() or "unknown CPU"
    for line in cpu_info().splitlines():  # none outside Linux: platform's answer stands
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{model}, {torch.get_num_threads()} threads" if device.type == "cpu" else f"{device.type} ({model})"
