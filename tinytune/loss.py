"""Causal-LM cross-entropy computed over the sequence in chunks.

Full-vocabulary logits are the largest activation of a small model (seq × vocab × 4 bytes: 2,048
tokens × 128,256 vocab = 1 GiB in fp32 for Llama 3). Each chunk's logits are recomputed in the
backward pass (non-reentrant checkpoint), so only one chunk's logits exist at any time and autograd
keeps just the chunk's hidden states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tinytune.data import IGNORE


def _chunk_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def causal_lm_loss_sum(
    head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = 1024, softcap: float | None = None
) -> tuple[torch.Tensor, int]:
    """Sum of next-token losses and the number of predicted tokens.

    hidden: (batch, seq, d) final hidden states; labels: (batch, seq) with -100 where no loss.
    Position t predicts labels[t + 1]. ``chunk`` counts tokens per piece (0 = all at once).
    """
    hidden = hidden[:, :-1, :]
    targets = labels[:, 1:]
    n_tokens = int((targets != IGNORE).sum())
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if chunk <= 0 or hidden.shape[0] <= chunk:
        return _chunk_loss_sum(head, hidden, targets, softcap), n_tokens
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if (t != IGNORE).any():
            if torch.is_grad_enabled() and h.requires_grad:
                total = total + checkpoint(_chunk_loss_sum, head, h, t, softcap, use_reentrant=False)
            else:
                total = total + _chunk_loss_sum(head, h, t, softcap)
    return total, n_tokens
