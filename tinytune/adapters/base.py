"""The interface every technique implements, and how adapters are attached to a model.

An adapter layer wraps one base linear layer (plain or quantized) and adds a trainable branch:
``h = base(x) + branch(x)``. Three methods are all the trainer and the exporter need:

- ``trainable_parameters()`` — what the optimizer updates;
- ``delta_weight()`` — the fp32 (out × in) matrix the branch adds to the base weight;
- ``merged_weight()`` — dequantized base weight + delta: what export writes.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from tinytune import quant
from tinytune.errors import UserError

ALL_LINEAR = "all-linear"


def matched(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight`` ready to multiply ``x``: as is under autocast (which casts it once per forward and
    caches the copy), else cast to ``x``'s dtype. Casting ``x`` to the fp32 adapter dtype instead would
    make autograd keep one fp32 copy of the input per adapted layer (measured: +1.7 KB per token per
    layer on a 64-wide bf16 model)."""
    if torch.is_autocast_enabled(x.device.type) or weight.dtype == x.dtype:
        return weight
    return weight.to(x.dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products with ``x`` run in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class AdapterLayer(nn.Module):
    """Base class of one adapted linear layer; ``base`` stays frozen."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = quant.linear_shape(base)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters(recurse=False) if p.requires_grad)

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def on_optimizer_step(self, step: int) -> None:
        """Called after each optimizer step (Delta-LoRA uses it); most techniques need nothing."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the layer's branch: parameters (trainable or frozen) and buffers."""
        out = {n: p for n, p in self.named_parameters(recurse=False)}
        out.update({n: b for n, b in self.named_buffers(recurse=False)})
        return out

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight a plain linear layer needs to give this layer's outputs, in fp32."""
        return quant.dequantized_weight(self.base) + self.delta_weight()


def target_linears(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full names of the decoder's linear layers selected by ``targets``."""
    from tinytune.loading import decoder_layers

    layers = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    linears = [
        f"{prefix}.{n}" for n, m in layers.named_modules() if quant.is_linear(m) and not isinstance(m, AdapterLayer)
    ]
    if ALL_LINEAR in targets:
        return linears
    short = sorted({n.rsplit(".", 1)[-1] for n in linears})
    chosen = [n for n in linears if n.rsplit(".", 1)[-1] in targets]
    missing = [t for t in targets if t not in short]
    if missing:
        raise UserError(
            f"--targets {','.join(missing)} matches no linear layer of the decoder; choose from "
            f"{','.join(short)} or all-linear"
        )
    return chosen


def attach(model: nn.Module, names: list[str], make: Callable[[str, nn.Module], AdapterLayer]) -> dict[str, AdapterLayer]:
    """Replace each named linear layer by ``make(name, layer)``; returns the adapters by name."""
    adapters = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = make(name, getattr(parent, attr))
        setattr(parent, attr, layer)
        adapters[name] = layer
    return adapters


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def check_rank(rank: int, names: list[str], model: nn.Module) -> None:
    for name in names:
        i, o = quant.linear_shape(model.get_submodule(name))
        if rank > min(i, o):
            raise UserError(f"--rank {rank} is larger than layer {name} ({o}×{i}) allows; use --rank {min(i, o)} or less")
