"""What the allocator and the OS say, labelled by what each figure is.

- ``mem_allocated_gib``: bytes in live tensors (``torch.cuda.memory_allocated``);
- ``mem_reserved_gib``: bytes the caching allocator holds from the driver (≥ allocated);
- ``mem_peak_gib``: the highest allocated figure since the last reset (``max_memory_allocated``);
- ``rss_gib``: this process's resident host memory (psutil). nvidia-smi shows reserved plus the
  CUDA context (≈0.3–0.5 GiB), so it reads higher than any of these.
"""

from __future__ import annotations

import psutil
import torch

GIB = 2**30
_PROCESS = psutil.Process()


def sample(device: torch.device) -> dict[str, float]:
    out = {"rss_gib": round(_PROCESS.memory_info().rss / GIB, 4)}
    if device.type == "cuda":
        out["mem_allocated_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 4)
        out["mem_reserved_gib"] = round(torch.cuda.memory_reserved(device) / GIB, 4)
        out["mem_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 4)
    return out


def device_total_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total
    return None


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({psutil.cpu_count(logical=True)} threads, {psutil.virtual_memory().total / GIB:.0f} GiB RAM)"
