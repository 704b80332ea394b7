"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2023, arXiv 2310.11454).

    h = W0·x + Λb · B · Λd · A · x

A (r × max d_in) and B (max d_out × r) are random, frozen and shared by every adapted layer; a layer
uses the slices A[:, :d_in] and B[:d_out, :]. Only the vectors b (d_out, init 0) and d (r, init
0.1) train, so the trainable count is Σ(d_out + r) over adapted layers. A and B are drawn from a seed
(Kaiming-uniform, as PEFT does) and saved with the run, so export and resume never regenerate them.

Where a layer is wider than the rank, Λb scales B's rows before the product instead of the product
after (``memory.estimate.vera_folds_lambda_b``): the same branch, but autograd keeps an r-wide
tensor per token for Λb's gradient, not a d_out-wide one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tinytune.adapters.base import AdapterLayer, matched
from tinytune.memory.estimate import vera_folds_lambda_b


def shared_matrices(rank: int, max_in: int, max_out: int, seed: int, device) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    a = torch.empty(rank, max_in)
    b = torch.empty(max_out, rank)
    for t in (a, b):  # kaiming_uniform_(a=sqrt(5)) with an explicit generator
        bound = 1.0 / math.sqrt(t.shape[1])
        t.uniform_(-bound, bound, generator=gen)
    return {"vera_A": a.to(device), "vera_B": b.to(device)}


class VeRALinear(AdapterLayer):
    def __init__(self, base: nn.Module, shared: dict[str, torch.Tensor], d_init: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__(base)
        self.shared = shared  # a plain dict: the matrices belong to the model, not to this layer
        rank = shared["vera_A"].shape[0]
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features))
        self.vera_lambda_d = nn.Parameter(torch.full((rank,), float(d_init)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fold_b = vera_folds_lambda_b(self.out_features, rank)

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shared["vera_A"][:, : self.in_features], self.shared["vera_B"][: self.out_features, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., d_in) → (..., d_out)."""
        result = self.base(x)
        a, b = self._slices()
        projected = matched(self.vera_lambda_d, x) * (self.dropout(x) @ matched(a, x).t())
        if self.fold_b:  # autograd keeps projected (r wide) for Λb's gradient
            branch = projected @ matched(self.vera_lambda_b[:, None] * b, x).t()
        else:  # it keeps B·Λd·A·x (d_out wide)
            branch = matched(self.vera_lambda_b, x) * (projected @ matched(b, x).t())
        return result + branch.to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._slices()
        return (self.vera_lambda_b.float()[:, None] * b.float()) @ (self.vera_lambda_d.float()[:, None] * a.float())
