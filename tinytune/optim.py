"""The optimizer: AdamW (bitsandbytes' paged 8-bit by default) over flat parameter groups.

An adapter run trains many small tensors: LoRA on every linear layer of Llama-3.1-8B is 448 of them
(A and B of 224 layers). bitsandbytes' optimizers update one tensor at a time, each with a Python
loop turn, a kernel launch and a ``torch.cuda.synchronize()`` (bitsandbytes 0.50 synchronizes after
every tensor), so the GPU idles between updates that take microseconds each. Here the tensors of
each group are views of one flat tensor, and their gradients views of one flat gradient that
autograd accumulates into in place: the optimizer sees one tensor per group and makes one update.

Adam is elementwise, so the 32-bit update is the same as the per-tensor one bit for bit. The 8-bit
states are quantized in blocks of 256 values that now run across tensor boundaries (equally valid;
the numbers differ in the last bits), and tensors below bitsandbytes' 4,096-value threshold for 8-bit
states share the flat tensor's 8-bit states. Each view starts on a 64-byte boundary so compiled
code may read parameters with aligned loads; the padding between views stays zero (zero gradient,
zero moments, zero update).

Full fine-tuning keeps the model's own tensors: moving them into one flat tensor would hold every
weight twice while it copies.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

ALIGN = 16
"""Views start at multiples of this many elements (64 bytes in fp32)."""


class FlatTensors:
    """Parameters of one dtype and device as views of one flat tensor, gradients of one flat gradient."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        offsets, n = [], 0
        for p in params:
            offsets.append(n)
            n += -(-p.numel() // ALIGN) * ALIGN
        first = params[0]
        self.flat = nn.Parameter(torch.zeros(n, dtype=first.dtype, device=first.device))
        self.flat_grad = torch.zeros_like(self.flat)
        self.grads = []
        with torch.no_grad():
            for p, start in zip(params, offsets):
                view = self.flat.data[start:start + p.numel()].view_as(p)
                view.copy_(p.data)
                p.data = view
                self.grads.append(self.flat_grad[start:start + p.numel()].view_as(p))
        self.attach()

    def attach(self) -> None:
        """Point the flat tensor's gradient at the flat one and every parameter's at its view of it
        (autograd adds to it in place)."""
        self.flat.grad = self.flat_grad
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                p.grad = g

    def gather(self) -> None:
        """Before an update: a gradient that something replaced (or removed) goes back into its view."""
        for p, g in zip(self.params, self.grads):
            if p.grad is None:
                g.zero_()
            elif p.grad is not g:
                g.copy_(p.grad)
        self.attach()

    def zero(self) -> None:
        self.flat_grad.zero_()
        self.attach()


def flatten(groups: list[dict]) -> tuple[list[dict], list[FlatTensors]]:
    """Optimizer groups whose parameters are flat tensors, and the flat tensors' bookkeeping."""
    flats, out = [], []
    for group in groups:
        by_kind: dict[tuple, list[nn.Parameter]] = {}
        for p in group["params"]:
            by_kind.setdefault((p.dtype, p.device), []).append(p)
        made = [FlatTensors(params) for params in by_kind.values()]
        flats += made
        out.append({**group, "params": [f.flat for f in made]})
    return out, flats


class _FlatMixin:
    """Put in front of an optimizer class: it updates flat tensors in place of the given groups'."""

    def __init__(self, params, *args, **kwargs) -> None:
        groups, self.flat_tensors = flatten([dict(g) for g in params])
        super().__init__(groups, *args, **kwargs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradients (never None: parameters' gradients are views of them)."""
        for f in self.flat_tensors:
            f.zero()

    def step(self, closure=None):
        for f in self.flat_tensors:
            f.gather()
        return super().step(closure)


@functools.cache
def _flat_class(cls: type) -> type:
    return type(f"Flat{cls.__name__}", (_FlatMixin, cls), {})


def make_optimizer(name: str, params: list[dict], lr: float, weight_decay: float,
                   flat: bool = True) -> torch.optim.Optimizer:
    """``params`` are parameter groups (LoRA+ gives B its own learning rate); ``flat``: update each
    group's tensors as one (see the module doc)."""
    if name == "adamw":
        cls = torch.optim.AdamW
    else:
        from tinytune.quant import load_bnb

        bnb = load_bnb()
        # On a CPU bitsandbytes falls back to unpaged state (it says so on every parameter); same math.
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        cls = {"paged-adamw-8bit": bnb.optim.PagedAdamW8bit, "paged-adamw-32bit": bnb.optim.PagedAdamW32bit}[name]
    return (_flat_class(cls) if flat else cls)(params, lr=lr, weight_decay=weight_decay)
