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
causal (built per tile from positions, packed rows' examples included), booleans for windowed
layers past their window.

Per tile, exactly eager's operations in eager's order: ``q·kᵀ·scaling``, ``tanh(·/cap)·cap``, the
mask (masked scores set to the dtype's minimum, which eager reaches by adding it), softmax in fp32,
the cast, dropout, ``·v``; masked keys contribute exact zeros either way (tested: logits equal,
gradients to 1e-7, greedy generation token for token).

Packed rows (several examples in one row, positions restarting at each) need attention kept inside
each example. Transformers does it with a (batch, 1, s, s) mask, which makes SDPA expand k and v to
every head, keep the mask as an additive bias in every layer and leave its flash kernel; and it
still computes every score across examples, only to mask it. A run that packs uses
``example_attention`` instead (``attend_per_example``): no mask is built where attention is plainly
causal apart from the packing, and each example of each row goes through SDPA on its own, causal,
k and v shared per group of heads: the scores across examples are never computed. Gemma 2's tiles
read the examples from the positions too, one (t, n) boolean per tile. A layer whose window is
shorter than the sequence still gets transformers' mask (the window, with the packing in it).
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from tinytune.memory.estimate import ATTENTION_TILE_TOKENS, EAGER_ATTENTION

NAME = "tinytune_tiled"
PER_EXAMPLE = "tinytune_per_example"
TILE_TOKENS = ATTENTION_TILE_TOKENS
"""Queries per tile: Gemma-2-2B at 8,192 tokens rebuilds 8 heads × 512 × 8,192 scores at a time
(32 MiB per byte a score takes), where eager attention kept 8 heads × 8,192 × 8,192 per layer."""


def _tile(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
          positions: torch.Tensor | None, first: int, scaling: float, softcap: float | None, dropout: float,
          training: bool) -> torch.Tensor:
    """query (b, h, t, d): the queries at positions ``first``…``first + t − 1`` of the keys; key,
    value (b, kv, n, d) up to the last of them; mask None (causal) or bool (b|1, 1, t, n), True =
    attend; positions None or the keys' position ids (b|1, n), restarting at each example of a
    packed row (attention causal within it) → (b, h, t, d)."""
    b, h, t, d = query.shape
    kv, n = key.shape[1], key.shape[2]
    groups = h // kv
    scores = torch.matmul(query.reshape(b, kv, groups * t, d), key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(b, kv, groups, t, n)
    if mask is None:
        allowed = torch.arange(n, device=query.device) <= torch.arange(first, first + t, device=query.device)[:, None]
        if positions is not None:  # (b|1, 1, 1, t, n): keys of the query's own example only
            examples = example_ids(positions)
            allowed = (allowed & (examples[:, first:first + t, None] == examples[:, None, :])).view(-1, 1, 1, t, n)
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
                    softcap: float | None = None, position_ids: torch.Tensor | None = None,
                    **_kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (b, h, q, d), key/value (b, kv, n, d), the mask from
    ``causal_or_sdpa_mask`` (None: causal, within each example where position ids restart; else bool
    (b|1, 1, q, n)) → ((b, q, h, d), no weights)."""
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    q_len, n = query.shape[2], key.shape[2]
    offset = n - q_len  # queries are the last q_len positions (a KV cache holds the ones before)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    packed = attention_mask is None and position_ids is not None and q_len == n > 1  # maybe: the tiles read them
    run = functools.partial(_tile, scaling=scaling, softcap=softcap, dropout=dropout, training=module.training)
    pieces = []
    for start in range(0, q_len, TILE_TOKENS):
        stop = min(q_len, start + TILE_TOKENS)
        keys = offset + stop  # the tile's last query attends no key after its own position
        mask = None if attention_mask is None else attention_mask[:, :, start:stop, :keys]
        positions = position_ids[:, :keys] if packed else None  # kept by every layer's tiles: the step's own
        args = (query[:, :, start:stop], key[:, :, :keys], value[:, :, :keys], mask, positions, offset + start)
        pieces.append(checkpoint(run, *args, use_reentrant=True) if grad else run(*args))
    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
    return out.transpose(1, 2).contiguous(), None


def example_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(b, s) position ids → (b, s): which example of its row each token is (0, 1, …), a new one
    wherever the position does not follow the one before (transformers' reading of packed rows)."""
    restarts = torch.diff(position_ids, dim=-1) != 1
    return torch.nn.functional.pad(restarts.cumsum(-1), (1, 0))


_spans_seen: tuple[weakref.ref, int, list | None] | None = None


def example_spans(position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int]]] | None:
    """Per row, the (start, stop) of each example; None where no row holds more than one. One
    transfer to the host per step: every layer (and its recomputation) gets the same position ids."""
    global _spans_seen
    if _spans_seen is not None and _spans_seen[0]() is position_ids and _spans_seen[1] == rows:
        return _spans_seen[2]
    length = position_ids.shape[-1]
    restarts = (torch.diff(position_ids.expand(rows, -1), dim=-1) != 1).nonzero().tolist()
    spans = None
    if restarts:
        starts = [[0] for _ in range(rows)]
        for row, i in restarts:
            starts[row].append(i + 1)
        spans = [list(zip(s, s[1:] + [length])) for s in starts]
    _spans_seen = (weakref.ref(position_ids), rows, spans)
    return spans


@torch.compiler.disable  # a loop over the examples a step's rows hold; compiled layers call it as it is
def example_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface for packed rows: with no mask (``causal_or_sdpa_mask``) and
    position ids that restart, SDPA runs causally on each example of each row alone, k and v shared
    per group of heads → ((b, q, h, d), no weights); otherwise transformers' SDPA attention as it is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q_len, d = query.shape
    spans = None
    if attention_mask is None and position_ids is not None and q_len == key.shape[2] > 1:
        spans = example_spans(position_ids, b)
    if spans is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    out = query.new_empty(b, q_len, h, d)  # the layout o_proj reads
    gqa = key.shape[1] != h
    for row, row_spans in enumerate(spans):
        for start, stop in row_spans:
            piece = torch.nn.functional.scaled_dot_product_attention(
                query[row:row + 1, :, start:stop], key[row:row + 1, :, start:stop], value[row:row + 1, :, start:stop],
                dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
            out[row:row + 1, start:stop] = piece.transpose(1, 2)
    return out, None


def causal_or_sdpa_mask(*, batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                        attention_mask: torch.Tensor | None = None, local_size: int | None = None,
                        **kwargs) -> torch.Tensor | None:
    """The mask builder for both attention functions here: none where attention is causal apart from
    packed rows (no padding mask, no KV cache, no window reached), which they read from the position
    ids themselves; otherwise transformers' SDPA mask (booleans; none where plainly causal). For
    text models: overlays such as image tokens' are not kept where no mask is built."""
    plain = (attention_mask is None and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0
             and q_length == kv_length and (local_size is None or kv_length < local_size))
    if plain:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, local_size=local_size, **kwargs)


def _register(name: str, function) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, causal_or_sdpa_mask)


def tile_attention(model) -> bool:
    """Run the attention of an architecture transformers runs eagerly (``EAGER_ATTENTION``) as
    ``tiled_attention``; True if it now does."""
    config = model.config
    if config.model_type not in EAGER_ATTENTION or config._attn_implementation != "eager":
        return False
    _register(NAME, tiled_attention)
    model.set_attn_implementation(NAME)
    return True


def attend_per_example(model) -> bool:
    """For a run that packs rows: run SDPA attention as ``example_attention``; True if it now does
    (Gemma 2's tiled attention already keeps to each example)."""
    if model.config._attn_implementation != "sdpa":
        return False
    _register(PER_EXAMPLE, example_attention)
    model.set_attn_implementation(PER_EXAMPLE)
    return True
