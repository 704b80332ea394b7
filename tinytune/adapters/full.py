"""Full fine-tuning: every weight trains, at 16 bits (fp32 on a CPU).

Not an adapter, but it answers the same questions — what trains, and (in ``adapters.state``) what is
saved: every weight — so the loop and the exporter treat it like any technique. A 4- or 8-bit base cannot be
fully fine-tuned: its weights are integer codes with no gradient, so the config refuses the pair.
"""

from __future__ import annotations

from torch import nn


def enable(model: nn.Module) -> None:
    model.requires_grad_(True)
    model.tinytune_full = True


def is_full(model: nn.Module) -> bool:
    return bool(getattr(model, "tinytune_full", False))


def parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
