"""tinytune's attention: no (s, s) mask in training, and no score computed only to be masked.

Transformers builds a (batch, 1, s, s) mask wherever attention is more than plainly causal: packed
rows (several examples in a row, positions restarting at each), windowed layers past their window
(Mistral, Gemma 2 and 3, Phi-3). With a mask SDPA gets k and v expanded to every head, keeps the
mask as an additive bias in every layer, leaves its flash kernel, and computes every score the
mask then hides. Two attention functions, registered with transformers' attention interface, take
over (``install``; the mask builder ``causal_or_sdpa_mask`` builds none where they do the work):

- ``sdpa_attention`` (SDPA architectures, where a layer is windowed or the run packs): each example
  of each row goes through SDPA on its own, causal, k and v shared per group of heads (the scores
  across examples are never computed); an example longer than the window runs in tiles of
  ``TILE_TOKENS`` queries, each reading only the keys of its window, with a (t, n) boolean of its
  own, under (reentrant) checkpointing: the layer keeps q, k and v, and one tile's k and v
  repeated to every head and its bias exist at a time, rebuilt in its backward.
- ``tiled_attention`` (Gemma 2, which transformers runs eagerly: SDPA cannot soft-cap its scores):
  eager attention keeps, per layer and token, q, k and v repeated to every head and heads × s score
  maps (the capped scores, the fp32 softmax and its 16-bit cast), 4 GiB for one Gemma-2-2B layer at
  8,192 tokens. Here the same arithmetic runs over tiles of ``TILE_TOKENS`` queries, each under
  checkpointing: a layer keeps q, k and v, and one tile's score maps exist at a time. Each tile reads
  only the keys from its window's start (or the row's) to its last query; k and v are shared by
  each group of query heads as they are, never repeated; which keys a query sees (causal, window,
  its own example) is one (t, n) boolean per tile. Per tile, exactly eager's operations in eager's
  order: ``q·kᵀ·scaling``, ``tanh(·/cap)·cap``, the mask (masked scores set to the dtype's minimum,
  which eager reaches by adding it), softmax in fp32, the cast, dropout, ``·v``; masked keys
  contribute exact zeros either way.

Where a mask is given (a padding mask, a KV cache: generation), both do what transformers does with
it. Tested against transformers' own attention on all nine architectures: the same loss and
gradients, logits and greedy generation; what a layer keeps and a tile rebuilds matches the
estimate byte for byte.
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from tinytune.memory.estimate import ATTENTION_TILE_TOKENS, EAGER_ATTENTION, ModelShape

TILED = "tinytune_tiled"
SDPA = "tinytune_sdpa"
TILE_TOKENS = ATTENTION_TILE_TOKENS
"""Queries per tile: Gemma-2-2B at 8,192 tokens rebuilds 8 heads × 512 × 8,192 scores at a time
(32 MiB per byte a score takes), where eager attention kept 8 heads × 8,192 × 8,192 per layer."""


def allowed_keys(t: int, n: int, first: int, window: int | None, positions: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """Which of n keys (a slice of a row) each of t queries, at slice positions ``first``…``first + t − 1``,
    attends: causally, within ``window`` tokens, and where ``positions`` (b|1, n: the keys' position
    ids) restart at each example of a packed row, within its own example → bool (t, n) or (b|1, t, n)."""
    q = torch.arange(first, first + t, device=device)[:, None]
    k = torch.arange(n, device=device)
    allowed = k <= q
    if window is not None:
        allowed = allowed & (k > q - window)
    if positions is not None:
        examples = example_ids(positions)
        allowed = allowed & (examples[:, first:first + t, None] == examples[:, None, :])
    return allowed


def _tile(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
          positions: torch.Tensor | None, first: int, window: int | None, scaling: float, softcap: float | None,
          dropout: float, training: bool) -> torch.Tensor:
    """query (b, h, t, d): the queries at positions ``first``…``first + t − 1`` of the keys; key,
    value (b, kv, n, d); mask None (``allowed_keys`` from ``positions`` and ``window``) or bool
    (b|1, 1, t, n), True = attend → (b, h, t, d)."""
    b, h, t, d = query.shape
    kv, n = key.shape[1], key.shape[2]
    groups = h // kv
    scores = torch.matmul(query.reshape(b, kv, groups * t, d), key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(b, kv, groups, t, n)
    if mask is None:
        allowed = allowed_keys(t, n, first, window, positions, query.device)
        allowed = allowed[:, None, None] if allowed.dim() == 3 else allowed  # (b, 1, 1, t, n) per row
    else:
        allowed = mask.unsqueeze(1)  # (b|1, 1, 1, t, n), a view: the step's mask is not copied
    scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs.view(b, kv, groups * t, n), value).view(b, h, t, d)


def _first_key(query_start: int, window: int | None, row_start: int = 0) -> int:
    """The first key a tile whose first query sits at ``query_start`` reads: its window's, or the row's."""
    return row_start if window is None else max(row_start, query_start - window + 1)


@torch.compiler.disable  # a loop of checkpoints over the sequence; compiled layers call it as it is
def tiled_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    softcap: float | None = None, position_ids: torch.Tensor | None = None,
                    sliding_window: int | None = None, **_kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (b, h, q, d), key/value (b, kv, n, d), the mask from
    ``causal_or_sdpa_mask`` (None: causal, within ``sliding_window`` and within each example where
    position ids restart; else bool (b|1, 1, q, n)) → ((b, q, h, d), no weights)."""
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    q_len, n = query.shape[2], key.shape[2]
    offset = n - q_len  # queries are the last q_len positions (a KV cache holds the ones before)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    packed = attention_mask is None and position_ids is not None and q_len == n > 1  # maybe: the tiles read them
    window = sliding_window if attention_mask is None else None  # a given mask holds the window
    run = functools.partial(_tile, window=window, scaling=scaling, softcap=softcap, dropout=dropout,
                            training=module.training)
    pieces = []
    for start in range(0, q_len, TILE_TOKENS):
        stop = min(q_len, start + TILE_TOKENS)
        key0, keys = _first_key(offset + start, window), offset + stop  # no key after the tile's last query
        mask = None if attention_mask is None else attention_mask[:, :, start:stop, key0:keys]
        positions = position_ids[:, key0:keys] if packed else None  # kept by every layer's tiles: the step's own
        args = (query[:, :, start:stop], key[:, :, key0:keys], value[:, :, key0:keys], mask, positions,
                offset + start - key0)
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


def _window_tile(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, first: int, window: int,
                 scaling: float | None, dropout: float) -> torch.Tensor:
    """SDPA over one tile of queries (1, h, t, d) at positions ``first``… of its keys (1, kv, n, d),
    each within its window: k and v repeated to every head, as transformers does for a mask (SDPA
    would leave its kernels for its slowest with a mask and shared k and v)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    allowed = allowed_keys(query.shape[2], key.shape[2], first, window, None, query.device)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout,
                                                            scale=scaling)


@torch.compiler.disable  # a loop over the examples a step's rows hold; compiled layers call it as it is
def sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                   position_ids: torch.Tensor | None = None, sliding_window: int | None = None,
                   **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: with no mask (``causal_or_sdpa_mask``), SDPA causally on each
    example of each row alone (examples where the position ids restart), k and v shared per group of
    heads, an example longer than ``sliding_window`` in checkpointed tiles of its windows →
    ((b, q, h, d), no weights); with a mask or a KV cache, or where neither packing nor a window
    applies, transformers' SDPA attention as it is."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q_len, d = query.shape
    spans = window = None
    if attention_mask is None and q_len == key.shape[2] > 1:
        window = sliding_window if sliding_window is not None and sliding_window < q_len else None
        spans = None if position_ids is None else example_spans(position_ids, b)
    if spans is None and window is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    tile = functools.partial(_window_tile, window=window, scaling=scaling, dropout=dropout)
    out = query.new_empty(b, q_len, h, d)  # the layout o_proj reads
    for row, row_spans in enumerate(spans or [[(0, q_len)]] * b):
        q, k, v = query[row:row + 1], key[row:row + 1], value[row:row + 1]
        for start, stop in row_spans:
            if window is None or stop - start <= window:
                piece = torch.nn.functional.scaled_dot_product_attention(
                    q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], dropout_p=dropout, scale=scaling,
                    is_causal=True, enable_gqa=k.shape[1] != h)
                out[row:row + 1, start:stop] = piece.transpose(1, 2)
                continue
            for t0 in range(start, stop, TILE_TOKENS):
                t1, key0 = min(stop, t0 + TILE_TOKENS), _first_key(t0, window, start)
                args = (q[:, :, t0:t1], k[:, :, key0:t1], v[:, :, key0:t1], t0 - key0)
                piece = checkpoint(tile, *args, use_reentrant=True) if grad else tile(*args)
                out[row:row + 1, t0:t1] = piece.transpose(1, 2)
    return out, None


def causal_or_sdpa_mask(*, batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                        attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask builder for both attention functions here: none without a padding mask or a KV cache
    (causal apart from packed rows and windows, which they read from the position ids and the
    layer's window themselves); otherwise transformers' SDPA mask (booleans; none where plainly
    causal). For text models: overlays such as image tokens' are not kept where no mask is built."""
    plain = (attention_mask is None and isinstance(q_offset, int) and q_offset == 0 and kv_offset == 0
             and q_length == kv_length)
    if plain:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def install(model, packed: bool = False) -> str | None:
    """Give ``model`` tinytune's attention where it changes anything: ``tiled_attention`` for the
    architectures transformers runs eagerly (``EAGER_ATTENTION``); ``sdpa_attention`` for SDPA ones
    with windowed layers, or all of them where the run packs rows. The implementation set, or None."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    config = model.config
    if config.model_type in EAGER_ATTENTION and config._attn_implementation in ("eager", TILED):
        name, function = TILED, tiled_attention
    elif config._attn_implementation in ("sdpa", SDPA) and (packed or any(ModelShape.from_config(config).sliding)):
        name, function = SDPA, sdpa_attention
    else:
        return None
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, causal_or_sdpa_mask)
    model.set_attn_implementation(name)
    return name
