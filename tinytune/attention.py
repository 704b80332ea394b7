"""Query-tiled attention for architectures transformers runs eagerly (Gemma 2: soft-capped scores).

Transformers has no SDPA path for Gemma 2 (SDPA cannot soft-cap the scores), so its eager attention
keeps, per layer and token, q, k and v repeated to every head and heads × s score maps (the capped
scores, the fp32 softmax and its 16-bit cast): at 8,192 tokens one Gemma-2-2B layer keeps 4 GiB,
and builds a float (batch, 1, s, s) mask per kind of layer each step. ``tile_attention`` replaces it
with the same arithmetic over tiles of ``TILE_TOKENS`` queries, each under (reentrant) gradient
checkpointing: a layer keeps q, k and v, and one tile's score maps exist at a time, rebuilt in its
backward. Each tile reads only the keys up to its last query (causal: the rest would be masked), so
the scores cost half the arithmetic; k and v are shared by each group of query heads as they are,
never repeated. Masks come from transformers' SDPA mask builder: none where attention is plainly
causal (built per tile from positions), booleans for windowed layers and packed rows.

Per tile, exactly eager's operations in eager's order: ``q·kᵀ·scaling``, ``tanh(·/cap)·cap``, the
mask (masked scores set to the dtype's minimum, which eager reaches by adding it), softmax in fp32,
the cast, dropout, ``·v``; masked keys contribute exact zeros either way (tested: logits equal,
gradients to 1e-7, greedy generation token for token).
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from tinytune.memory.estimate import ATTENTION_TILE_TOKENS, EAGER_ATTENTION

NAME = "tinytune_tiled"
TILE_TOKENS = ATTENTION_TILE_TOKENS
"""Queries per tile: Gemma-2-2B at 8,192 tokens rebuilds 8 heads × 512 × 8,192 scores at a time
(32 MiB per byte a score takes), where eager attention kept 8 heads × 8,192 × 8,192 per layer."""


def _tile(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, first: int,
          scaling: float, softcap: float | None, dropout: float, training: bool) -> torch.Tensor:
    """query (b, h, t, d): the queries at positions ``first``…``first + t − 1`` of the keys; key,
    value (b, kv, n, d) up to the last of them; mask None (causal) or bool (b|1, 1, t, n), True =
    attend → (b, h, t, d)."""
    b, h, t, d = query.shape
    kv, n = key.shape[1], key.shape[2]
    groups = h // kv
    scores = torch.matmul(query.reshape(b, kv, groups * t, d), key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(b, kv, groups, t, n)
    if mask is None:
        allowed = torch.arange(n, device=query.device) <= torch.arange(first, first + t, device=query.device)[:, None]
    else:
        allowed = mask.unsqueeze(1)  # (b|1, 1, 1, t, n), a view: the step's mask is not copied
    scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs.view(b, kv, groups * t, n), value).view(b, h, t, d)


@torch.compiler.disable  # a loop of checkpoints over the sequence; compiled layers call it as it is
def tiled_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    softcap: float | None = None, **_kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (b, h, q, d), key/value (b, kv, n, d), the mask from
    its SDPA builder (None: causal; else bool (b|1, 1, q, n)) → ((b, q, h, d), no weights)."""
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    q_len, n = query.shape[2], key.shape[2]
    offset = n - q_len  # queries are the last q_len positions (a KV cache holds the ones before)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    run = functools.partial(_tile, scaling=scaling, softcap=softcap, dropout=dropout, training=module.training)
    pieces = []
    for start in range(0, q_len, TILE_TOKENS):
        stop = min(q_len, start + TILE_TOKENS)
        keys = offset + stop  # the tile's last query attends no key after its own position
        mask = None if attention_mask is None else attention_mask[:, :, start:stop, :keys]
        args = (query[:, :, start:stop], key[:, :, :keys], value[:, :, :keys], mask, offset + start)
        pieces.append(checkpoint(run, *args, use_reentrant=True) if grad else run(*args))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, tiled_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # booleans; None where attention is plainly causal


def tile_attention(model) -> bool:
    """Run the attention of an architecture transformers runs eagerly (``EAGER_ATTENTION``) as
    ``tiled_attention``; True if it now does."""
    config = model.config
    if config.model_type not in EAGER_ATTENTION or config._attn_implementation != "eager":
        return False
    _register()
    model.set_attn_implementation(NAME)
    return True
