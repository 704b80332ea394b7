"""Causal-LM cross-entropy computed over the sequence in chunks, its gradient taken in forward.

Full-vocabulary logits are the largest activation of a small model (seq × vocab × 4 bytes: 2,048
tokens × 128,256 vocab = 1 GiB in fp32 for Llama 3). The loss runs over the tokens in chunks (1,024
tokens, fewer for large vocabularies: ``loss_chunk_tokens``, which the memory estimate counts too), and
each chunk's gradient (with respect to the hidden states and any trainable head weights) is taken
right away, in the forward pass: only one chunk's logits exist at any time, autograd keeps no
logits at all, and the backward pass only scales the stored gradients by the incoming one. A
checkpointed chunk (the way to get the same memory with plain autograd) would run the head's
matmul and the softmax a second time in backward; taking the gradient in forward runs each once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tinytune.data import IGNORE
from tinytune.memory.estimate import loss_chunk_tokens


def _chunk_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


class _LossWithGradient(torch.autograd.Function):
    """Summed loss over ``spans`` of (tokens, d) ``hidden``; the gradients are computed here, in forward."""

    @staticmethod
    def forward(ctx, hidden, targets, head, softcap, spans, *params):
        want_hidden = ctx.needs_input_grad[0]
        wanted = [i for i, w in enumerate(ctx.needs_input_grad[5:]) if w]  # params that need a gradient
        grads: list[torch.Tensor | None] = [torch.zeros_like(hidden) if want_hidden else None] + [None] * len(params)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start, end in spans:
            with torch.enable_grad():
                h = hidden[start:end].detach().requires_grad_(want_hidden)
                loss = _chunk_loss_sum(head, h, targets[start:end], softcap)
                got = torch.autograd.grad(loss, ([h] if want_hidden else []) + [params[i] for i in wanted])
            total += loss.detach()
            if want_hidden:
                grads[0][start:end] = got[0]
                got = got[1:]
            for i, g in zip(wanted, got):
                grads[1 + i] = g if grads[1 + i] is None else grads[1 + i].add_(g)
        ctx.grads = grads
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("the chunked loss's stored gradients were already used; backward runs once per forward")
        scaled = [g.mul_(grad_total) if g is not None else None for g in grads]
        return (scaled[0], None, None, None, None, *scaled[1:])


def causal_lm_loss_sum(
    head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk: int | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of next-token losses and the number of predicted tokens.

    hidden: (batch, seq, d) final hidden states; labels: (batch, seq) with -100 where no loss, on
    hidden's device or on the host (where counting the chunks' predicted tokens needs no wait for the
    device: the trainer passes them so). Position t predicts labels[t + 1]. ``chunk`` counts tokens
    per piece (0 = all at once; None = ``loss_chunk_tokens`` of the head's vocabulary, as the memory
    estimate counts it).
    """
    if chunk is None:
        chunk = loss_chunk_tokens(getattr(head, "out_features", None) or head.weight.shape[0])
    hidden = hidden[:, :-1, :]
    targets = labels[:, 1:].reshape(-1)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    size = max(1, hidden.shape[0] if chunk <= 0 else chunk)
    # how many tokens each chunk predicts, read in one go (from the device only if the labels are there)
    valid = F.pad((targets != IGNORE).int(), (0, -targets.shape[0] % size)).view(-1, size).sum(1)
    counts = valid.tolist()
    targets = targets.to(hidden.device, non_blocking=True)
    spans = [(i * size, min((i + 1) * size, hidden.shape[0])) for i, c in enumerate(counts) if c]
    params = [p for p in head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        total = _LossWithGradient.apply(hidden, targets, head, softcap, spans, *params)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start, end in spans:
            total = total + _chunk_loss_sum(head, hidden[start:end], targets[start:end], softcap)
    return total, sum(counts)
