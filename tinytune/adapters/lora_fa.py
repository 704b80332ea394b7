"""LoRA-FA: LoRA with A frozen (Zhang et al. 2023, arXiv 2308.03303).

    h = W0·x + s · B·dropout(A·x),     A frozen at its random init, only B trains

The point is activation memory. LoRA's backward needs x (d_in wide) for A's gradient; with A frozen
autograd only needs A itself for x's gradient, and B's gradient needs A·x (r wide). A quantized or
frozen W0 saves no x either, so an adapted layer keeps r instead of d_in numbers per token.

Dropout: LoRA applies it to x, which would store a d_in-wide mask and re-save a d_in-wide tensor —
undoing the saving. Here it acts on A·x instead (r wide), the same regularizer on the branch's
bottleneck; ``--dropout 0`` removes it entirely.
"""

from __future__ import annotations

import torch
from torch import nn

from tinytune.adapters.base import matched
from tinytune.adapters.lora import LoRALinear


class LoRAFALinear(LoRALinear):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base, rank, alpha, dropout, rslora)
        self.lora_A.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) → (..., d_out); autograd keeps x·A (..., r), not x."""
        result = self.base(x)
        projected = self.dropout(x @ matched(self.lora_A, x).t())
        return result + ((projected @ matched(self.lora_B, x).t()) * self.scaling).to(result.dtype)
