"""Full fine-tuning: every weight trains, at 16 bits (fp32 on a CPU).

Not an adapter, but it plugs into the same three questions — what trains, what is saved, how it is
restored — so the loop and the exporter treat it like any technique. A 4- or 8-bit base cannot be
fully fine-tuned: its weights are integer codes with no gradient, so the config refuses the pair.
"""

from __future__ import annotations

import torch
from torch import nn


def enable(model: nn.Module) -> None:
    model.requires_grad_(True)
    model.tinytune_full = True


def is_full(model: nn.Module) -> bool:
    return bool(getattr(model, "tinytune_full", False))


def parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # tied weights appear once


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors))[:3], sorted(set(tensors) - set(params))[:3]
        raise ValueError(f"weights do not fit this model (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ValueError(f"weight {name} has shape {tuple(value.shape)}, model expects {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].device, params[name].dtype))
