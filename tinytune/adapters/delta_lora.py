"""Delta-LoRA (Zi et al. 2023, arXiv 2309.02411): W follows the change of the low-rank product.

After K warm-up steps every optimizer step also moves the base weight:

    W(t+1) = W(t) + λ · s · (B(t+1)·A(t+1) − B(t)·A(t))

On a 4-bit base W cannot be rewritten, but the sum telescopes: for t ≥ K

    W(t) = W0 + λ · s · (B_t·A_t − B_K·A_K)

so the forward adds λ·s·x·(B·A)ᵀ with A and B detached (no gradient flows through W, exactly as in
the paper, where W is not a trainable parameter) and subtracts λ·s·x·(B_K·A_K)ᵀ from a frozen snapshot
taken at step K. The gradients of A and B are those of Delta-LoRA; the quantized weights stay
untouched. The low-rank branch has no dropout (the paper removes it so that W's update is exact).
"""

from __future__ import annotations

import torch
from torch import nn

from tinytune.adapters.base import matched
from tinytune.adapters.lora import LoRALinear


class DeltaLoRALinear(LoRALinear):
    def __init__(self, base: nn.Module, rank: int, alpha: float, rslora: bool = False, delta_lambda: float = 2.0,
                 start_step: int = 500) -> None:
        super().__init__(base, rank, alpha, dropout=0.0, rslora=rslora)
        self.delta_lambda = delta_lambda
        self.start_step = start_step
        self.register_buffer("snap_A", torch.zeros(rank, self.in_features))
        self.register_buffer("snap_B", torch.zeros(self.out_features, rank))
        self.register_buffer("active", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) → (..., d_out)."""
        result = self.base(x)
        a, b = matched(self.lora_A, x), matched(self.lora_B, x)
        branch = (x @ a.t()) @ b.t() * self.scaling
        if bool(self.active):
            follow = (x @ a.detach().t()) @ b.detach().t()
            origin = (x @ matched(self.snap_A, x).t()) @ matched(self.snap_B, x).t()
            branch = branch + (self.delta_lambda * self.scaling) * (follow - origin)
        return result + branch.to(result.dtype)

    @torch.no_grad()
    def on_optimizer_step(self, step: int) -> None:
        """Called after optimizer step ``step``: at step K take the snapshot and start following."""
        if step == self.start_step and not bool(self.active):
            self.snap_A.copy_(self.lora_A)
            self.snap_B.copy_(self.lora_B)
            self.active.fill_(True)

    def delta_weight(self) -> torch.Tensor:
        delta = super().delta_weight()
        if bool(self.active):
            follow = self.lora_B.float() @ self.lora_A.float() - self.snap_B.float() @ self.snap_A.float()
            delta = delta + self.delta_lambda * self.scaling * follow
        return delta
