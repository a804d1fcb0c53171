"""The machine a benchmark ran on, for the first line of its output: CPU model, core count, torch and numpy
versions (and the GPU where torch sees one)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` knows)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe() -> str:
    """One line: "CPU <model>, <n> cores, torch <v>, numpy <v>[, GPU <name>]"."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"CPU {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, numpy {np.__version__}{gpu}"
