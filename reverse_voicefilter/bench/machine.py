"""What the figures depend on: the CPU (model, bf16 grade), cores and threads, torch, the GPU, and
how loaded the machine was when the benchmark started."""
import os
import platform
import re
from pathlib import Path


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    """The bf16-related instruction sets the CPU advertises (x86 Linux only)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    return sorted(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags)


def describe_machine(device):
    """A dict of what the figures depend on (printed above each table, stored in the JSON)."""
    import torch

    from reverse_voicefilter.core.precision import cpu_bf16_support

    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_bf16": cpu_bf16_support(),  # native, converted or none (reverse_voicefilter.core.precision)
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(info):
    parts = [f"CPU {info['cpu']} ({info['cores']} cores, torch threads {info['torch_threads']})",
             f"CPU bf16: {info['cpu_bf16']}", f"torch {info['torch']}", f"device {info['device']}"]
    if info.get("gpu"):
        parts.append(f"GPU {info['gpu']}")
    if info.get("load_average"):
        parts.append("load average " + " ".join(str(x) for x in info["load_average"]))
    return "; ".join(parts)


def busy_note(info):
    """A warning when the machine was already loaded at the start (load average >= 0.5)."""
    load = (info.get("load_average") or [0])[0]
    if load < 0.5:
        return None
    return (f"Note: the 1-minute load average was {load:.2f} before the benchmark started: other jobs share the "
            f"{info['cores']} cores, so CPU times are inflated (with all cores as torch threads, OpenMP threads "
            f"that wait for a busy core can make a step several times slower: --threads 1 gives steadier figures).")


