"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv 2106.09685).

    h = W0·x + s · B·A·dropout(x),     s = alpha / r   (rsLoRA, arXiv 2312.03732: alpha / sqrt(r))

A (r × d_in) starts Kaiming-uniform and B (d_out × r) at zero, so training starts from the base
model exactly; both train. W0 may be 4-bit, 8-bit or 16-bit: the branch never looks inside it.
Initialisation and scaling follow PEFT's ``LoraLayer`` so the same weights give the same outputs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tinytune.adapters.base import AdapterLayer, compute_dtype, matched
from tinytune.adapters.branch import lora_branch


class LoRALinear(AdapterLayer):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base)
        self.rank = rank
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) → (..., d_out)."""
        result = self.base(x)
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.training else 0.0
        if p > 0:  # one operation that draws the mask again in backward instead of keeping it
            dtype = compute_dtype(x)
            branch = lora_branch(x.to(dtype), self.lora_A.to(dtype), self.lora_B.to(dtype), self.scaling, p)
            return result + branch.to(result.dtype)
        branch = x @ matched(self.lora_A, x).t() @ matched(self.lora_B, x).t()
        return result + (branch * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling
