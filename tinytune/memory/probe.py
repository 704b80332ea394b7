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


def model_storages(model: torch.nn.Module) -> set[int]:
    """Storage addresses of what the model holds anyway: parameters, buffers, VeRA's shared matrices."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    return own | {t.untyped_storage().data_ptr() for t in getattr(model, "tinytune_shared", {}).values()}


def saved_activation_bytes(model: torch.nn.Module, run_backward) -> int:
    """Bytes autograd keeps for backward while ``run_backward()`` runs a forward and backward.

    Counts each storage once and leaves out parameters, buffers and other tensors the model holds
    anyway (VeRA's shared matrices), so the figure is activations only.
    """
    own = model_storages(model)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_backward()
    return sum(seen.values())


def device_total_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total
    return None


def cap_fraction(budget_bytes: int, total_bytes: int) -> float | None:
    """The share of the card the caching allocator may use for the process to stay within
    ``budget_bytes``, the CUDA context (outside the allocator) included; None for a budget of the
    whole card or more."""
    from tinytune.memory.estimate import CUDA_CONTEXT_BYTES

    if budget_bytes >= total_bytes:
        return None
    return max(0.0, budget_bytes - CUDA_CONTEXT_BYTES) / total_bytes


def cap_to_budget(budget_bytes: int, device: torch.device) -> float | None:
    """Cap this process's allocator so that it acts as a card of ``budget_bytes`` (past that it
    raises out-of-memory, as that card would); returns the fraction set, or None if none was."""
    fraction = cap_fraction(budget_bytes, device_total_bytes(device))
    if fraction is not None:
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({psutil.cpu_count(logical=True)} threads, {psutil.virtual_memory().total / GIB:.0f} GiB RAM)"
