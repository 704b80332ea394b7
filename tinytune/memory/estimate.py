"""Predicted memory of a training run, from shapes alone (no weights, no device).

Every figure is bytes, and every component is a separate function of a ``ModelShape`` and a
``Setup`` so a plan can show where its memory goes. What autograd keeps per decoder layer was
derived op by op from the transformers layers and checked against ``saved_tensors_hooks`` on real
(tiny) models of every supported architecture, for every technique, 4/8/16-bit bases, fp32 and
bf16, with and without dropout and packing: tests/test_estimate.py holds those checks.

Per token and decoder layer (d = activation bytes: 2 under bf16/fp16, 4 in fp32):

- each RMSNorm keeps its fp32 input and the reciprocal RMS: 4h + 4 (×2 norms);
- attention keeps RoPE'd q and k, v and the output for SDPA (flash / memory-efficient, never an s×s
  matrix) plus fp32 log-sum-exp per head. No training batch has a mask: a right-padded one needs
  none (``data.collate``: causal attention already keeps real tokens from the pads after them), and
  packed rows and windows are tinytune.attention's: SDPA on each example alone (o_proj then reads a
  copy of the pieces put together), a layer past its window in checkpointed tiles;
- the MLP keeps gate, silu(gate) and up (3 × d·i);
- a linear layer whose input a trainable matrix multiplies (LoRA's A, a full weight) keeps its
  input (once per distinct input; LoRA's dropout draws its mask again in backward, so it keeps no
  more), VeRA with dropout its dropped copy plus the mask; every LoRA branch keeps x·A (d·r); VeRA
  keeps x·A (d·r) and, for λ_b's gradient, the narrower of its second product's input (d·r, where
  λ_b scales B's rows first) and output (d·out); LoRA-FA, whose A is frozen, keeps neither x nor a
  copy.

What other architectures add to a Llama layer:

- Qwen3 and Gemma 3 normalize q and k per head, OLMo 2 over all of q and all of k: each such norm
  keeps its fp32 input and one reciprocal RMS per head (per token for OLMo 2);
- Gemma 2 and 3 have four norms on the hidden width, not two, and Gemma's norms scale by (1 + w),
  an fp32 vector each call keeps (per layer, not per token);
- Gemma 2 has no SDPA path in transformers (its scores are soft-capped); tinytune runs its attention
  in tiles of queries (tinytune.attention), so a layer keeps q, k and v (not repeated), and heads × s
  score maps per token (the capped scores in the compute dtype, the fp32 softmax and, in 16 bits,
  its cast) exist for one tile at a time (``attention_tile_bytes``);
- Phi-3 fuses q/k/v and gate/up into one projection each; v is a view of the fused output, so what
  SDPA keeps of v holds all of it; its RoPE'd q is laid out head-major, so SDPA's output is too and
  o_proj's input is a copy of its own;
- a windowed layer (Mistral, Gemma, Phi-3) past its window runs its attention in tiles of queries
  (tinytune.attention) and keeps q, k and v, as Gemma 2's does; a tile's k and v repeated to every
  head and its bias exist while backward rebuilds it (``attention_tile_bytes``).

With gradient checkpointing only each layer's input (d·h per token) is kept for the whole model;
one layer's set above exists again while its backward runs. Layers left out of checkpointing (the
last ones) keep their whole set.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

GIB = 2**30

# NF4 + double quantization: 4 bits, one 8-bit absmax per 64 weights, one fp32 per 256 absmax blocks.
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8
CUDA_CONTEXT_BYTES = int(0.5 * GIB)  # driver, kernels and cuBLAS workspace: outside the allocator
ALLOCATOR_SLACK = 0.06  # caching-allocator fragmentation: reserved ≈ 1.06 × allocated at peak
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit optimizer states for tensors smaller than this
LOSS_CHUNK = 1024  # most tokens per chunk of the output head + cross-entropy (tinytune.loss)
LOSS_CHUNK_LOGITS = 2**26  # and fewer for large vocabularies: one chunk's logits stay within this many

ADAPTER_TECHNIQUES = ("lora", "lora-fa", "vera", "delta-lora", "lora-plus")


EAGER_ATTENTION = ("gemma2",)
"""Model types whose transformers attention has no SDPA path (soft-capped scores): tinytune runs it
in tiles of queries (tinytune.attention), so score maps exist for one tile at a time."""
ATTENTION_TILE_TOKENS = 512
"""Queries per tile of that attention (tinytune.attention.TILE_TOKENS)."""
QK_NORM = {"qwen3": "head", "gemma3_text": "head", "olmo2": "full"}
"""RMSNorms on q and k: over each head ("head") or over all of q and all of k ("full")."""
FOUR_NORMS = ("gemma2", "gemma3_text")  # also around the attention's and the MLP's outputs
NORM_PLUS_ONE = ("gemma", "gemma2", "gemma3_text")  # a norm scales by (1 + w), computed in fp32 each call
FUSED = ("phi3",)  # one qkv_proj and one gate_up_proj per layer


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs to know about a decoder: a transformers config, reduced. Where
    architectures differ in what a layer keeps for backward (extra norms, eager attention, fused
    projections, sliding windows), the model type decides, as transformers' code for it does."""

    name: str
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_context: int
    qkv_bias: bool = False
    attn_softcap: bool = False
    """Attention scores soft-capped (tanh): one more score map kept, where attention is eager."""
    logit_softcap: bool = False
    """The head's logits soft-capped (tanh): one more fp32 copy of a loss chunk's logits."""
    sliding_window: int = 0
    sliding: tuple[bool, ...] = ()
    """Per decoder layer, whether its attention is windowed to ``sliding_window`` tokens (empty: none is)."""

    @classmethod
    def from_config(cls, config, name: str = "") -> "ModelShape":
        get = (lambda k, default=None: config.get(k, default)) if isinstance(config, dict) else (
            lambda k, default=None: getattr(config, k, default))
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        model_type = get("model_type")
        layers = get("num_hidden_layers")
        return cls(
            name=name or get("_name_or_path", "") or model_type, model_type=model_type,
            layers=layers, hidden=hidden, intermediate=get("intermediate_size"), heads=heads,
            kv_heads=get("num_key_value_heads") or heads, head_dim=get("head_dim") or hidden // heads,
            vocab=get("vocab_size"), tied=bool(get("tie_word_embeddings", False)),
            max_context=get("max_position_embeddings") or 0,
            qkv_bias=bool(get("attention_bias", False)) or model_type == "qwen2",
            attn_softcap=bool(get("attn_logit_softcapping")), logit_softcap=bool(get("final_logit_softcapping")),
            sliding_window=get("sliding_window") or 0, sliding=_sliding_layers(get, layers),
        )

    @property
    def fused(self) -> bool:
        return self.model_type in FUSED

    @property
    def eager_attention(self) -> bool:
        return self.model_type in EAGER_ATTENTION

    @property
    def qk_norm(self) -> str:
        return QK_NORM.get(self.model_type, "")

    @property
    def layer_norms(self) -> int:
        """RMSNorms over the hidden width in one decoder layer."""
        return 4 if self.model_type in FOUR_NORMS else 2

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of one decoder layer."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        if self.fused:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params_per_layer(self) -> int:
        return sum(i * o for i, o in self.linears().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def qk_norms(self) -> tuple[int, int, int]:
        """One layer's q and k norms: (weights, normalized values per token, reciprocal RMS values
        per token: one per head, or one each for all of q and all of k)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"head": (2 * self.head_dim, q + kv, self.heads + self.kv_heads),
                "full": (q + kv, q + kv, 2)}.get(self.qk_norm, (0, 0, 0))

    @property
    def n_params(self) -> int:
        norms = (self.layer_norms * self.layers + 1) * self.hidden + self.layers * self.qk_norms[0]
        bias = self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return self.layers * self.linear_params_per_layer + self.embedding_params + norms + bias


def _sliding_layers(get, layers: int) -> tuple[bool, ...]:
    """Which layers window their attention: transformers' ``layer_types``, else every
    ``sliding_window_pattern``-th layer attends fully (a preset's shorthand), else all of them
    where a window is set (Mistral)."""
    if not get("sliding_window"):
        return ()
    if types := get("layer_types"):
        return tuple(t == "sliding_attention" for t in types)
    pattern = get("sliding_window_pattern")
    return tuple((i + 1) % pattern != 0 for i in range(layers)) if pattern else (True,) * layers


@dataclass(frozen=True)
class Setup:
    """The choices that decide memory; ``device`` is "cuda" (bf16/fp16 compute) or "cpu" (fp32)."""

    technique: str = "lora"
    rank: int = 16
    bits: int = 4
    micro_batch: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = True
    optim: str = "paged-adamw-8bit"
    dropout: float = 0.05
    targets: tuple[str, ...] = ("all-linear",)
    device: str = "cuda"
    packed: bool = False
    """Rows packed with several examples, each attending only to itself without a mask (SDPA per
    example, tinytune.attention; right-padded batches have no mask either: ``data.collate``)."""
    loss_chunk: int | None = None
    """Tokens per chunk of the loss: None = ``loss_chunk_tokens`` of the vocabulary, 0 = all at once."""
    offload: bool = False
    """Checkpointed layer inputs in host memory (memsave.offload_checkpoints)."""
    mlp_tiles: int = 1
    """MLP run over the sequence in this many checkpointed tiles (memsave.tile_mlp)."""
    plain_layers: int = 0
    """With checkpointing, the last this many decoder layers run without it (memsave.plain_last_layers)."""

    @property
    def act_bytes(self) -> int:
        return 2 if self.device == "cuda" else 4

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    def adapted(self, shape: ModelShape) -> list[str]:
        names = list(shape.linears())
        if self.technique == "full" or "all-linear" in self.targets:
            return names
        return [n for n in names if n in self.targets]


@dataclass
class Estimate:
    """Predicted bytes per component; ``peak`` is what the GPU must hold at the worst moment."""

    shape: ModelShape
    setup: Setup
    components: dict[str, int] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    trainable_params: int = 0

    @property
    def peak(self) -> int:
        return sum(self.components.values())

    @property
    def allocator_peak(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` should read: paged optimizer state lives in
        unified memory outside PyTorch's allocator."""
        paged = self.setup.optim.startswith("paged") and self.setup.device == "cuda"
        return self.peak - (self.components.get("optimizer states", 0) if paged else 0)

    @property
    def overhead(self) -> int:
        """Allocator slack and the CUDA context: memory the card loses beyond live tensors."""
        if self.setup.device != "cuda":
            return 0
        return int(ALLOCATOR_SLACK * self.peak) + CUDA_CONTEXT_BYTES

    @property
    def needed(self) -> int:
        return self.peak + self.overhead

    def table(self) -> list[tuple[str, int, str]]:
        rows = [(k, v, self.notes.get(k, "")) for k, v in self.components.items()]
        if self.overhead:
            rows.append(("allocator slack + CUDA context", self.overhead,
                         f"{ALLOCATOR_SLACK:.0%} of the peak + {CUDA_CONTEXT_BYTES / GIB:.1f} GiB context"))
        return rows


# --- static memory ---------------------------------------------------------------------------------

def base_weight_bytes(shape: ModelShape, setup: Setup) -> int:
    """The decoder's linear layers as they sit on the device."""
    n = shape.layers * shape.linear_params_per_layer
    if setup.bits == 4:
        return int(n * NF4_BYTES_PER_PARAM)
    if setup.bits == 8:
        outs = sum(o for _, o in shape.linears().values())
        return n + shape.layers * outs * 4  # int8 rows + one fp32 scale per row
    return n * setup.act_bytes


def unquantized_bytes(shape: ModelShape, setup: Setup) -> int:
    """Embeddings, head, norms (and q/k/v biases), kept in the compute dtype; an untied, frozen input
    embedding lives in host memory on CUDA (memsave.embeddings_on_host)."""
    n = shape.n_params - shape.layers * shape.linear_params_per_layer
    if host_embeddings(shape, setup):
        n -= shape.vocab * shape.hidden
    return n * setup.act_bytes


def host_embeddings_apply(tied: bool, technique: str, device_type: str) -> bool:
    """Whether the input table moves to host memory: on CUDA, untied from the head (which needs the
    weight on the GPU), frozen (not full fine-tuning)."""
    return device_type == "cuda" and not tied and technique != "full"


def host_embeddings(shape: ModelShape, setup: Setup) -> bool:
    return host_embeddings_apply(shape.tied, setup.technique, setup.device)


def adapter_params(shape: ModelShape, setup: Setup) -> tuple[int, int, int]:
    """(trainable, stored fp32, trainable in tensors ≥ bitsandbytes' 8-bit threshold). The optimizer
    updates each group's adapter tensors as one flat tensor (``tinytune.optim``), so the threshold
    applies to a group's total: LoRA+ has two groups (A, and B at a higher learning rate)."""
    lin = shape.linears()
    names = setup.adapted(shape)
    r = setup.rank
    if setup.technique == "full":
        return shape.n_params, 0, shape.n_params
    if setup.technique == "vera":
        trainable = shape.layers * sum(lin[n][1] + r for n in names)
        max_in = max(lin[n][0] for n in names)
        max_out = max(lin[n][1] for n in names)
        return trainable, trainable + r * (max_in + max_out), _flat_8bit([trainable])
    groups = [shape.layers * sum(r * lin[n][0] for n in names), shape.layers * sum(r * lin[n][1] for n in names)]
    stored = sum(groups)
    trainable = groups[1] if setup.technique == "lora-fa" else stored
    big = _flat_8bit(groups if setup.technique == "lora-plus" else [trainable])
    if setup.technique == "delta-lora":
        stored *= 2  # the A/B snapshot W's follow term starts from
    return trainable, stored, big


def _flat_8bit(groups: list[int]) -> int:
    return sum(n for n in groups if n >= BNB_8BIT_MIN_SIZE)


def optimizer_bytes(trainable: int, big: int, optim: str, param_bytes: int) -> int:
    """Adam's two moments: 8-bit blockwise (2 bytes + an fp32 absmax per 256) or in 32 bits."""
    if optim == "paged-adamw-8bit":
        small = trainable - big
        return int(big * (2 + 2 * 4 / 256)) + small * 8
    if optim == "adamw":
        return trainable * 2 * param_bytes
    return trainable * 8


# --- activations -----------------------------------------------------------------------------------

MLP_LINEARS = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
INPUT_GROUPS = {"q_proj": "in1", "k_proj": "in1", "v_proj": "in1", "qkv_proj": "in1", "o_proj": "attn",
                "gate_proj": "in2", "up_proj": "in2", "gate_up_proj": "in2", "down_proj": "act"}
"""Linear layers that share an input (a LoRA layer keeps its input once per group)."""
NORM_WEIGHT_FP32 = (*NORM_PLUS_ONE, "olmo2")  # norms that multiply by their weight in fp32


def windowed_layers(shape: ModelShape) -> list[bool]:
    """Per decoder layer, whether its attention is windowed."""
    return [i < len(shape.sliding) and shape.sliding[i] for i in range(shape.layers)]


def past_window_layers(shape: ModelShape, setup: Setup) -> list[bool]:
    """Per decoder layer, whether its window is shorter than the sequence (its attention in tiles)."""
    short = 0 < shape.sliding_window < setup.seq_len
    return [short and windowed for windowed in windowed_layers(shape)]


def layer_saved_bytes_per_token(shape: ModelShape, setup: Setup, past_window: bool = False) -> float:
    """Bytes autograd keeps per token for one decoder layer without checkpointing (see module doc);
    ``past_window``: whether its window is shorter than the sequence."""
    return sum(_saved_per_token(shape, setup, past_window))


def layer_saved_fixed_bytes(shape: ModelShape, setup: Setup) -> int:
    """Bytes one decoder layer keeps whatever the tokens: Gemma's norms scale by (1 + w), a new fp32
    vector each call, kept for the input's gradient."""
    if shape.model_type not in NORM_PLUS_ONE:
        return 0
    return 4 * (shape.layer_norms * shape.hidden + shape.qk_norms[0])


def _saved_per_token(shape: ModelShape, setup: Setup, past_window: bool) -> tuple[float, float]:
    """(the layer's saved bytes per token outside its MLP, inside its MLP: what a tile rebuilds)."""
    d = setup.act_bytes
    mask_b = 1 if setup.device == "cuda" else d  # dropout masks: bool on CUDA, the dtype on CPU
    h, i, r, t = shape.hidden, shape.intermediate, setup.rank, setup.technique
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    lin = shape.linears()
    names = setup.adapted(shape)
    full = t == "full"
    _, normed, rms = shape.qk_norms

    total = shape.layer_norms * (4 * h + 4) + 4 * (normed + rms)  # norms: fp32 inputs + reciprocal RMS
    if full:  # the normalized input kept for the norm weight's gradient
        total += (4 if shape.model_type in NORM_WEIGHT_FP32 else d) * (shape.layer_norms * h + normed)
    # in tiles: q, k and v, which each tile's checkpoint keeps; the scores live in one tile. A packed
    # row's examples no longer than the window go through SDPA whole: counted so, the larger
    tiled = shape.eager_attention or (past_window and not setup.packed)
    if tiled:
        total += d * (q + 2 * kv)
    else:
        total += d * (q + q + kv + kv) + 4 * shape.heads  # q, out, k, v + log-sum-exp
    if shape.fused:  # v, a view of the fused projection's output, keeps all of it
        total += d * (q + kv)
    mlp = 3 * d * i  # gate, silu(gate), up

    needs_x = full or t in ("lora", "lora-plus", "delta-lora")
    # LoRA's dropout draws its mask again in backward (adapters.branch): it keeps x, as without dropout
    dropout = setup.dropout > 0 and t in ("vera", "lora-fa")
    kept_inputs = set()
    for n in names:
        n_in, n_out = lin[n]
        own = 0
        if dropout and t != "lora-fa":
            own += mask_b * n_in + (d * n_in if needs_x else 0)
        elif needs_x:
            kept_inputs.add(INPUT_GROUPS[n])
        if t == "lora-fa":
            own += d * r + (mask_b * r if dropout else 0)
        elif t == "vera":  # Λd·(x·Aᵀ)'s r-wide input, and the narrower side of Λb's product
            own += d * r + d * (r if vera_folds_lambda_b(n_out, r) else n_out)
        elif not full:
            own += d * r
        if n in MLP_LINEARS:
            mlp += own
        else:
            total += own
    # SDPA keeps its output in the layout o_proj reads, unless q came out of a fused projection (its
    # RoPE'd copy is laid out head-major, and so is the output) or it ran in pieces (per example, in
    # tiles: they are put together); tiled attention keeps none
    attn_copied = shape.eager_attention or shape.fused or setup.packed or past_window
    sizes = {"in1": h, "in2": h, "act": i, "attn": q if attn_copied else 0}
    total += sum(d * sizes[g] for g in kept_inputs if g in ("in1", "attn"))
    mlp += sum(d * sizes[g] for g in kept_inputs if g in ("in2", "act"))
    return total, mlp


def activation_bytes(shape: ModelShape, setup: Setup) -> tuple[int, int]:
    """(kept for the whole step, what backward adds at most while it rebuilds).

    A tiled MLP keeps only its input (each tile's checkpoint holds its piece); backward rebuilds one
    tile's saved tensors at a time, checkpointed layers or not. Plain (not checkpointed) layers are
    the last ones, whose backward runs first: by the time a checkpointed layer is rebuilt their
    activations are gone, so the rebuild only adds what it needs beyond them."""
    d, n = setup.act_bytes, setup.tokens
    layer_input = d * shape.hidden * n
    fixed = layer_saved_fixed_bytes(shape, setup)

    def kept_by(past_window: bool) -> tuple[float, float]:  # (what a layer that runs once keeps, one MLP tile's rebuild)
        outside, mlp = _saved_per_token(shape, setup, past_window)
        if setup.mlp_tiles > 1:
            return outside * n + layer_input + fixed, mlp * n / setup.mlp_tiles
        return (outside + mlp) * n + fixed, 0.0

    kinds = past_window_layers(shape, setup)
    by_kind = {k: kept_by(k) for k in set(kinds)}
    per_layer = [by_kind[k][0] for k in kinds]
    tile = max(max(t for _, t in by_kind.values()), attention_tile_bytes(shape, setup))
    final = (4 * shape.hidden + 4 + d * shape.hidden) * n  # final norm + the head's input
    if not setup.gradient_checkpointing:
        return int(sum(per_layer) + final), int(tile)
    plain = min(setup.plain_layers, shape.layers)
    plain_bytes = sum(per_layer[shape.layers - plain:])
    kept = plain_bytes + final
    if plain == shape.layers:
        return int(kept), int(tile)
    rebuilt = max(per_layer[: shape.layers - plain]) + tile
    if setup.offload:  # in host memory; in backward: the input the GPU is finishing with, the one taken back,
        rebuilt += 3 * layer_input  # the one coming (memsave.FETCHES_AHEAD)
    else:
        kept += checkpoint_inputs_bytes(shape, setup)
    return int(kept), int(max(tile, rebuilt - plain_bytes))


def attention_tile_bytes(shape: ModelShape, setup: Setup) -> int:
    """What one tile of tinytune's tiled attention keeps while backward rebuilds it, at most (forward
    builds the same without keeping it).

    Gemma 2's (the last tile reads every key): per score the soft-capped score in the compute dtype,
    the fp32 softmax and, in 16 bits, its cast; the tile's queries regrouped per k/v head, and k and
    v as the products read them (RoPE and the projections leave all three laid out token-major); the
    boolean of the keys each query sees (per row for packed rows: each example's own keys).

    A windowed SDPA layer past its window (one row at a time, t queries reading t + window − 1 keys
    at most): k and v repeated to every head (where heads share them), the bias SDPA makes of the
    boolean (the dtype per key), the output and the fp32 log-sum-exp per head."""
    d, s = setup.act_bytes, setup.seq_len
    queries = min(ATTENTION_TILE_TOKENS, s)
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    if shape.eager_attention:
        per_score = 4 + (d if shape.attn_softcap else 0) + (d if d != 4 else 0)
        rows = setup.micro_batch if setup.packed else 1
        return setup.micro_batch * (queries * (shape.heads * s * per_score + d * q) + 2 * d * kv * s) + rows * queries * s
    if not any(past_window_layers(shape, setup)):
        return 0
    keys = min(s, queries + shape.sliding_window - 1)
    return (2 * d * q * keys if q > kv else 0) + d * queries * keys + queries * (d * q + 4 * shape.heads)


def checkpoint_inputs_bytes(shape: ModelShape, setup: Setup) -> int:
    """Every checkpointed decoder layer's input, which checkpointing keeps (on the GPU, or offloaded)."""
    return max(0, shape.layers - setup.plain_layers) * setup.act_bytes * shape.hidden * setup.tokens


def host_offload_bytes(shape: ModelShape, setup: Setup) -> int:
    """Pinned host memory for offloaded checkpoints: every layer's input."""
    return checkpoint_inputs_bytes(shape, setup) if setup.offload else 0


def vera_folds_lambda_b(out_features: int, rank: int) -> bool:
    """Whether a VeRA layer scales B's rows by Λb before its product (``p·(ΛbB)ᵀ``) rather than the
    product after (``Λb·(pBᵀ)``, as the paper writes it): the same branch, but Λb's gradient then
    needs the r-wide input of the product instead of its d_out-wide output, so autograd keeps the
    narrower of the two per token (Llama-3.1-8B at r=256: 512 bytes instead of 2,048 to 28,672 per
    adapted linear layer in bf16). The scaled copy of B is kept instead, once per layer."""
    return out_features > rank


def adapter_cast_bytes(shape: ModelShape, setup: Setup, trainable: int, stored: int) -> int:
    """Copies of the adapter weights each layer multiplies by, kept for backward: 16-bit casts of the
    fp32 weights (autocast caches LoRA's once per step), and VeRA's made by every layer (its shared A
    and B cast again, in fp32 its B scaled by Λb: ``vera_folds_lambda_b``). A checkpointed layer's
    first forward keeps none of VeRA's; its copies exist again only while backward rebuilds it."""
    if setup.technique == "full":
        return 0
    if setup.technique == "vera":
        layers = min(shape.layers, setup.plain_layers + 1) if setup.gradient_checkpointing else shape.layers
        return layers * vera_layer_copies_bytes(shape, setup, trainable // shape.layers)
    return 0 if setup.act_bytes == 4 else stored * setup.act_bytes


def vera_layer_copies_bytes(shape: ModelShape, setup: Setup, trainable_per_layer: int) -> int:
    """The copies of VeRA's matrices and vectors one decoder layer keeps for backward."""
    lin, r = shape.linears(), setup.rank
    names = setup.adapted(shape)
    if setup.act_bytes == 4:  # B scaled by Λb (a tiled MLP does that inside each tile's checkpoint)
        kept = [n for n in names if setup.mlp_tiles <= 1 or n not in MLP_LINEARS]
        return r * sum(lin[n][1] for n in kept if vera_folds_lambda_b(lin[n][1], r)) * 4
    shared = r * sum(sum(lin[n]) for n in names)  # A and B; a folded layer casts ΛbB, not Λb and B apart
    folded = sum(lin[n][1] for n in names if vera_folds_lambda_b(lin[n][1], r))
    return (trainable_per_layer + shared - folded) * setup.act_bytes


def backward_work_bytes(shape: ModelShape, setup: Setup) -> int:
    """Gradients in flight through one layer: the residual stream's and the MLP intermediates'."""
    d, n = setup.act_bytes, setup.tokens
    return int((3 * d * shape.hidden + 3 * d * shape.intermediate / max(1, setup.mlp_tiles)) * n)


def loss_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk of the loss (tinytune.loss): ``LOSS_CHUNK``, halved while a chunk's logits
    would exceed ``LOSS_CHUNK_LOGITS`` values (≈0.9 GiB at the 14 bytes per logit a chunk holds in
    bf16): 512 for Llama 3's 128,256-token vocabulary, 256 for Qwen2's and Gemma's."""
    tokens = LOSS_CHUNK
    while tokens > 64 and tokens * vocab > LOSS_CHUNK_LOGITS:
        tokens //= 2
    return tokens


def loss_chunk(shape: ModelShape, setup: Setup) -> int:
    """Tokens in the largest chunk of this setup's loss."""
    chunk = loss_chunk_tokens(shape.vocab) if setup.loss_chunk is None else setup.loss_chunk
    return min(chunk or setup.tokens, setup.tokens)


def loss_bytes(shape: ModelShape, setup: Setup) -> int:
    """One chunk of logits (head output, its fp32 copy, log-softmax and its gradient; soft-capped, the
    capped copy too), and the gradient of the head's input that the loss fills chunk by chunk in
    forward (tinytune.loss)."""
    chunk = loss_chunk(shape, setup)
    per_logit = setup.act_bytes + 4 + 4 + 4 + (4 if shape.logit_softcap else 0)
    return chunk * shape.vocab * per_logit + setup.tokens * shape.hidden * setup.act_bytes


def dequant_scratch_bytes(shape: ModelShape, setup: Setup) -> int:
    """A quantized layer's weight dequantized for one matmul (4-bit), or int8 matmul buffers (8-bit)."""
    if setup.bits == 16 or setup.device != "cuda":
        return 0
    biggest = max(i * o for i, o in shape.linears().values())
    if setup.bits == 4:
        return biggest * setup.act_bytes
    widest = max(o for _, o in shape.linears().values())
    return biggest * setup.act_bytes + setup.tokens * (widest * 4 + shape.intermediate)


def estimate(shape: ModelShape, setup: Setup) -> Estimate:
    """Predicted peak memory of one training step, by component."""
    if setup.technique == "full" and setup.bits != 16:
        raise ValueError("full fine-tuning needs a 16-bit base")
    trainable, stored, big = adapter_params(shape, setup)
    est = Estimate(shape, setup, trainable_params=trainable)
    c, notes = est.components, est.notes
    param_bytes = setup.act_bytes if setup.technique == "full" else 4
    bits_note = {4: "NF4 + double quant, 4.13 bits/param", 8: "LLM.int8, int8 + fp32 row scales",
                 16: f"{8 * setup.act_bytes}-bit"}[setup.bits]
    c["base weights"] = base_weight_bytes(shape, setup)
    notes["base weights"] = f"{shape.layers * shape.linear_params_per_layer / 1e9:.2f}B decoder linear params, {bits_note}"
    c["embeddings, norms, head"] = unquantized_bytes(shape, setup)
    notes["embeddings, norms, head"] = (f"{'tied' if shape.tied else 'untied'} {shape.vocab:,}-token vocab, unquantized"
                                        + ("; input table in host memory" if host_embeddings(shape, setup) else ""))
    if setup.technique != "full":
        c["adapter weights"] = stored * 4 + adapter_cast_bytes(shape, setup, trainable, stored)
        notes["adapter weights"] = f"{trainable:,} trainable, fp32" + (" + bf16 autocast copies" if setup.act_bytes == 2 else "")
    c["gradients"] = trainable * param_bytes
    c["optimizer states"] = optimizer_bytes(trainable, big, setup.optim, param_bytes)
    notes["optimizer states"] = setup.optim + (" (unified memory, evictable to host)" if setup.optim.startswith("paged") else "")
    kept, rebuilt = activation_bytes(shape, setup)
    c["activations"] = kept
    notes["activations"] = (f"{setup.micro_batch}×{setup.seq_len} tokens, "
                            + ("final layer only; layer inputs offloaded to host "
                               f"({host_offload_bytes(shape, setup) / 2**30:.2f} GiB pinned)" if setup.offload and setup.gradient_checkpointing
                               else "layer inputs only (gradient checkpointing)" if setup.gradient_checkpointing
                               else "every layer's saved tensors")
                            + (f"; the last {setup.plain_layers} layers keep theirs (not checkpointed)"
                               if setup.gradient_checkpointing and setup.plain_layers else "")
                            + (f", MLP in {setup.mlp_tiles} tiles" if setup.mlp_tiles > 1 else ""))
    loss = loss_bytes(shape, setup)
    layer = rebuilt + backward_work_bytes(shape, setup) + dequant_scratch_bytes(shape, setup)
    c["backward working set"] = max(loss, layer)
    notes["backward working set"] = (f"logits of {loss_chunk(shape, setup)} tokens" if loss >= layer
                                     else "one MLP tile recomputed + gradients through one layer"
                                     if rebuilt and not setup.gradient_checkpointing
                                     else "one layer recomputed + its gradients" if rebuilt
                                     else "gradients through one layer (the plain layers' activations outweigh a rebuilt layer)"
                                     if setup.gradient_checkpointing and setup.plain_layers
                                     else "gradients through one layer")
    return est


def with_(setup: Setup, **changes) -> Setup:
    return replace(setup, **changes)
