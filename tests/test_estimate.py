"""The estimator against what real (tiny) models allocate and save, on the CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoConfig, AutoModelForCausalLM

from tinytune import adapters, attention, loading, presets, quant
from tinytune.config import TrainConfig
from tinytune.loss import causal_lm_loss_sum
from tinytune.memory import estimate as E
from tinytune.memory.probe import model_storages, saved_activation_bytes

SHAPE_KW = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2)
ARCHITECTURES = loading.SUPPORTED_MODEL_TYPES


def _config(layers: int, model_type: str = "llama"):
    """A tiny config of ``model_type``; where the architecture has windowed layers, a window (16)
    shorter than the tests' 32 tokens, so that those layers' masks are exercised."""
    if model_type == "llama":
        return tiny_llama_config(num_hidden_layers=layers, **SHAPE_KW)
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, head_dim=16, max_position_embeddings=512,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=2, **SHAPE_KW)
    if getattr(config, "sliding_window", None):
        config.sliding_window = 16
    return config


def _model(layers: int, bits: int, technique: str, rank: int, dropout: float, dtype: torch.dtype, model_type: str = "llama",
           packed: bool = False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config(layers, model_type)).to(dtype)
    model.requires_grad_(False)
    if bits != 16:
        for layer in model.model.layers:
            loading.replace_linears(layer, lambda linear: quant.quantize_linear(linear, bits, torch.device("cpu"), dtype))
    attention.install(model, packed)  # as loading does (Gemma 2, windowed layers), and a run that packs
    adapters.apply(model, TrainConfig(technique=technique, rank=rank, alpha=2 * rank, dropout=dropout, bits=bits), 100)
    return model


def _saved(model, batch: int, seq: int, packed: bool) -> int:
    """What a training step saves, on batches as ``data.collate`` makes them: no attention mask (a
    right-padded batch saves what a full one does), or packed rows' position ids (two examples each).
    Without a KV cache, as the trainer runs (a cache would copy k and v: Phi-3's v is otherwise a view
    of its fused projection's output; with one, transformers would not mask packed rows either).
    Counted in forward: what backward saves again (Gemma 2's attention tiles rebuilt) is not kept."""
    model.train()
    ids = torch.randint(0, 256, (batch, seq))
    positions = (torch.arange(seq) % (seq // 2)).expand_as(ids) if packed else None
    losses = []

    def forward():
        hidden = model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
        losses.append(causal_lm_loss_sum(model.lm_head, hidden, ids, chunk=0)[0])

    saved = saved_activation_bytes(model, forward)
    losses[0].backward()
    return saved


CASES = [
    ("lora", 16, 0.0, torch.float32), ("lora", 4, 0.05, torch.float32), ("lora", 8, 0.0, torch.float32),
    ("lora-plus", 4, 0.0, torch.float32), ("delta-lora", 4, 0.0, torch.float32),
    ("lora-fa", 4, 0.0, torch.float32), ("lora-fa", 4, 0.05, torch.float32),
    ("vera", 4, 0.0, torch.float32), ("vera", 4, 0.05, torch.float32), ("full", 16, 0.0, torch.float32),
    ("lora", 16, 0.0, torch.bfloat16), ("lora", 4, 0.05, torch.bfloat16), ("lora-fa", 16, 0.0, torch.bfloat16),
    ("vera", 16, 0.0, torch.bfloat16), ("full", 16, 0.0, torch.bfloat16),
]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("technique,bits,dropout,dtype", CASES, ids=[f"{c[0]}-{c[1]}bit-p{c[2]}-{str(c[3])[6:]}" for c in CASES])
def test_saved_bytes_per_layer_match_autograd(technique, bits, dropout, dtype, packed, model_type):
    """One decoder layer's saved tensors, as autograd reports them, equal the formula byte for byte,
    for every architecture tinytune loads (extra norms, q/k norms, eager soft-capped attention,
    fused projections, windowed layers: the window is shorter than the sequence).

    The difference between a 4-layer and a 2-layer model isolates two layers from the embedding
    and loss. In bf16 without autocast each layer also keeps bf16 copies of its fp32 adapter weights;
    LoRA's dropout keeps an 8-byte seed per branch instead of its mask.
    """
    rank, batch, seq = 8, 2, 32
    per_two = _saved(_model(4, bits, technique, rank, dropout, dtype, model_type, packed), batch, seq, packed) - _saved(
        _model(2, bits, technique, rank, dropout, dtype, model_type, packed), batch, seq, packed)
    shape = E.ModelShape.from_config(_config(4, model_type))
    # "cpu" counts fp32 activations; the bf16 cases use the CUDA activation size with CPU dropout masks.
    d = 2 if dtype == torch.bfloat16 else 4
    setup = E.Setup(technique=technique, rank=rank, bits=bits, micro_batch=batch, seq_len=seq, dropout=dropout,
                    device="cuda" if d == 2 else "cpu", packed=packed, gradient_checkpointing=False)
    past_window = E.past_window_layers(shape, setup)[2:]  # the two layers the difference isolates
    per_token = sum(E.layer_saved_bytes_per_token(shape, setup, w) for w in past_window)
    if d == 2 and dropout and technique in ("vera", "lora-fa"):  # dropout masks stay in the dtype on a CPU
        n_in = sum(i for i, _ in shape.linears().values())
        per_token += 2 * (d - 1) * (n_in if technique != "lora-fa" else rank * len(shape.linears()))
    casts = 0
    if d == 2:
        casts = E.adapter_cast_bytes(shape, setup, *E.adapter_params(shape, setup)[:2]) // shape.layers
    elif technique == "vera":  # fp32: each layer keeps B with its rows scaled by Λb
        casts = E.adapter_cast_bytes(shape, setup, *E.adapter_params(shape, setup)[:2]) // shape.layers
        assert casts == rank * sum(o for _, o in shape.linears().values()) * 4
    seeds = 8 * len(shape.linears()) if dropout and technique in ("lora", "lora-plus") else 0  # each branch's mask seed (int64)
    assert per_two == per_token * batch * seq + 2 * (casts + seeds + E.layer_saved_fixed_bytes(shape, setup))


@pytest.mark.parametrize("model_type", ARCHITECTURES)
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("technique", ["lora", "lora-fa", "vera", "delta-lora"])
def test_weight_and_adapter_bytes_match_the_model(bits, technique, model_type):
    """Base weights (with bitsandbytes' quantization state) and adapter tensors, counted on a real model."""
    model = _model(2, bits, technique, 8, 0.0, torch.float32, model_type)
    shape = E.ModelShape.from_config(_config(2, model_type))
    setup = E.Setup(technique=technique, rank=8, bits=bits, device="cpu")

    linear_bytes, other_bytes, adapter_bytes = 0, 0, 0
    for name, module in model.named_modules():
        if quant.is_linear(module) and ".layers." in name and not isinstance(module, adapters.AdapterLayer):
            w = module.weight
            linear_bytes += w.numel() * w.element_size()
            qs = getattr(w, "quant_state", None)
            if qs is not None:  # 4-bit: absmax codes, their fp32 scales, the NF4 code book
                linear_bytes += qs.absmax.numel() * qs.absmax.element_size()
                linear_bytes += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
            scb = getattr(w, "SCB", None)
            if scb is not None:
                linear_bytes += scb.numel() * scb.element_size()
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if ".layers." in name and (name.endswith(".weight") and ".base." in name or "proj.weight" in name):
            continue
        if "rotary_emb" in name or p.dim() == 0:  # RoPE's inverse frequencies, Gemma's embedding scale
            continue
        if any(k in name for k in ("lora_", "vera_", "snap_")):
            adapter_bytes += p.numel() * p.element_size()
        elif name != "active" and not name.endswith(".active"):
            other_bytes += p.numel() * p.element_size()
    adapter_bytes += sum(t.numel() * t.element_size() for t in getattr(model, "tinytune_shared", {}).values())

    trainable, stored, _ = E.adapter_params(shape, setup)
    assert trainable == sum(p.numel() for p in adapters.trainable(model))
    assert adapter_bytes == stored * 4
    assert other_bytes == E.unquantized_bytes(shape, setup)
    assert linear_bytes == pytest.approx(E.base_weight_bytes(shape, setup), rel=0.002)


@pytest.mark.parametrize("technique,rank", [("lora", 8), ("lora-plus", 8), ("lora-fa", 8), ("vera", 8), ("lora", 1)])
def test_optimizer_state_bytes_match_the_flat_optimizer(technique, rank):
    """The paged 8-bit AdamW's states after a step (8-bit where a group's flat tensor reaches 4,096
    values, else 32-bit), to within the flat tensors' alignment padding."""
    from tinytune import optim

    cfg = tiny_llama_config(num_hidden_layers=2, **SHAPE_KW)
    model = _model(2, 4, technique, rank, 0.0, torch.float32)
    shape, setup = E.ModelShape.from_config(cfg), E.Setup(technique=technique, rank=rank, bits=4, device="cpu")
    tc = TrainConfig(technique=technique, rank=rank, bits=4)
    opt = optim.make_optimizer("paged-adamw-8bit", adapters.param_groups(model, tc), 1e-4, 0.0)
    for p in adapters.trainable(model):
        p.grad.normal_()
    opt.step()
    measured = sum(t.numel() * t.element_size() for state in opt.state.values() for k, t in state.items()
                   if k in ("state1", "state2", "absmax1", "absmax2"))
    trainable, _, big = E.adapter_params(shape, setup)
    padding = sum(f.flat.numel() for f in opt.flat_tensors) - trainable
    assert 0 <= padding < optim.ALIGN * len(adapters.trainable(model))
    assert E.optimizer_bytes(trainable, big, "paged-adamw-8bit", 4) <= measured
    assert measured <= E.optimizer_bytes(trainable + padding, big + padding * (big > 0), "paged-adamw-8bit", 4) + 16


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_full_fine_tuning_counts_every_parameter(model_type):
    shape = E.ModelShape.from_config(_config(2, model_type))
    model = _model(2, 16, "full", 8, 0.0, torch.float32, model_type)
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    est = E.estimate(shape, E.Setup(technique="full", bits=16, device="cpu", optim="adamw"))
    assert est.trainable_params == shape.n_params
    assert est.components["gradients"] == shape.n_params * 4
    assert est.components["optimizer states"] == shape.n_params * 8


def test_presets_size_like_the_published_models():
    """Parameter counts of the shape presets against the sizes their makers publish."""

    published = {"llama-3.1-8b": 8.03e9, "llama-3.2-1b": 1.24e9, "llama-3.2-3b": 3.21e9, "mistral-7b": 7.25e9,
                 "qwen2.5-7b": 7.62e9, "smollm2-135m": 134.5e6, "smollm2-360m": 361.8e6, "smollm2-1.7b": 1.71e9,
                 "gemma-2-2b": 2.61e9, "gemma-3-1b": 1.00e9, "qwen3-4b": 4.02e9, "qwen3-8b": 8.19e9,
                 "phi-3-mini": 3.82e9, "olmo-2-7b": 7.30e9}
    for name, n in published.items():
        assert presets.model_shape(name).n_params == pytest.approx(n, rel=0.01), name


@pytest.mark.parametrize("name", presets.model_names())
def test_a_preset_reads_as_transformers_reads_its_config(name):
    """A preset's shape (windowed layers from its pattern shorthand, soft-capping) equals the shape of
    the config transformers builds from the same fields, with its own defaults for the rest."""
    _, fields = presets.model_config(name)
    fields = {k: v for k, v in fields.items() if k != "sliding_window_pattern"}  # transformers' default pattern
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    assert presets.model_shape(name) == E.ModelShape.from_config(config, name=name)


def test_checkpointing_and_techniques_order_memory_as_expected():
    shape = presets.model_shape("llama-3.1-8b")
    base = E.Setup(seq_len=2048)
    lora, no_ckpt = E.estimate(shape, base), E.estimate(shape, E.with_(base, gradient_checkpointing=False))
    assert no_ckpt.components["activations"] > 10 * lora.components["activations"]
    fa = E.estimate(shape, E.with_(base, technique="lora-fa", gradient_checkpointing=False))
    assert fa.components["activations"] < no_ckpt.components["activations"]
    vera = E.estimate(shape, E.with_(base, technique="vera", rank=256))
    assert vera.trainable_params < lora.trainable_params / 10
    assert E.estimate(shape, E.with_(base, bits=16)).peak > E.estimate(shape, E.with_(base, bits=8)).peak > lora.peak
    # NF4 8B: 6.98B decoder linear params ≈ 3.35 GiB, + 0.98 GiB of bf16 head (the input table is in
    # host memory; on the CPU both count).
    assert 3.3 < lora.components["base weights"] / E.GIB < 3.4
    assert 0.95 < lora.components["embeddings, norms, head"] / E.GIB < 1.0
    on_cpu = E.estimate(shape, E.with_(base, device="cpu")).components["embeddings, norms, head"]
    assert 3.6 < on_cpu / E.GIB < 4.2  # fp32, both tables


def _peak_live_saved_bytes(own: set[int], run) -> int:
    """The most bytes autograd holds for backward at any one time while ``run()`` runs (each storage
    once; ``own``: storages left out, such as what the model holds anyway, as saved_activation_bytes
    does). Checkpointing's recomputation keeps its tensors out of these hooks, so this sees layers
    that are not checkpointed and the MLP tiles' own checkpoints."""
    live: dict[int, list[int]] = {}
    state = {"now": 0, "peak": 0}

    class Held:
        def __init__(self, t: torch.Tensor) -> None:
            self.t, ptr = t, t.untyped_storage().data_ptr()
            self.ptr = None if ptr in own else ptr
            if self.ptr is not None:
                entry = live.setdefault(ptr, [t.untyped_storage().nbytes(), 0])
                if entry[1] == 0:
                    state["now"] += entry[0]
                    state["peak"] = max(state["peak"], state["now"])
                entry[1] += 1

        def __del__(self) -> None:
            if self.ptr is not None:
                entry = live[self.ptr]
                entry[1] -= 1
                if entry[1] == 0:
                    state["now"] -= entry[0]
                    del live[self.ptr]

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.t):
        run()
    return state["peak"]


def _step_peak(layers: int, technique: str, dtype: torch.dtype, prepare) -> int:
    """``_peak_live_saved_bytes`` of one step (2 × 32 tokens) of a new model, ``prepare(model)`` first."""
    model = _model(layers, 16, technique, 8, 0.0, dtype)
    prepare(model)
    model.train()
    ids = torch.randint(0, 256, (2, 32))

    def run():
        hidden = model.model(input_ids=ids).last_hidden_state
        loss, _ = causal_lm_loss_sum(model.lm_head, hidden, ids, chunk=0)
        loss.backward()

    return _peak_live_saved_bytes(model_storages(model), run)


def _predicted_kept(layers: int, technique: str, **setup_kw) -> int:
    """What the estimator says that model keeps for the whole step: activations and adapter copies."""
    shape = E.ModelShape.from_config(tiny_llama_config(num_hidden_layers=layers, **SHAPE_KW))
    setup = E.Setup(technique=technique, rank=8, bits=16, micro_batch=2, seq_len=32, dropout=0.0,
                    **setup_kw)
    return E.activation_bytes(shape, setup)[0] + E.adapter_cast_bytes(shape, setup, *E.adapter_params(shape, setup)[:2])


def test_checkpointed_vera_layers_keep_their_copies_only_while_rebuilt():
    """Every VeRA layer multiplies by bf16 copies of the shared A and B (and its scaled B); a
    checkpointed layer keeps them only while backward rebuilds it, so two more checkpointed layers
    add their inputs and nothing else at the peak, as the estimator says."""
    from tinytune import memsave

    def peak(layers: int) -> int:
        return _step_peak(layers, "vera", torch.bfloat16, memsave.enable_checkpointing)

    def kept(layers: int) -> int:
        return _predicted_kept(layers, "vera", device="cuda")

    layer_input = 2 * 64 * 2 * 32  # bf16, hidden 64, 2 × 32 tokens
    assert peak(4) - peak(2) == kept(4) - kept(2) == 2 * layer_input


@pytest.mark.parametrize("technique", ["lora", "lora-fa", "vera"])
@pytest.mark.parametrize("tiles", [1, 2, 4])
def test_a_tiled_mlp_keeps_only_its_input_per_layer(technique, tiles):
    """What layers keep at the end of the forward, with the MLP run in tiles: its input only (in the
    tiles' checkpoints); their gate, up, product and adapter inputs are gone until backward rebuilds
    one tile. Two more layers add exactly what the estimator says they keep (VeRA: with its scaled B
    in fp32)."""
    from tinytune import memsave

    def peak(layers: int) -> int:
        return _step_peak(layers, technique, torch.float32, lambda model: memsave.tile_mlp(model, tiles))

    def kept(layers: int) -> int:
        return _predicted_kept(layers, technique, device="cpu", mlp_tiles=tiles, gradient_checkpointing=False)

    assert peak(4) - peak(2) == kept(4) - kept(2)


def test_a_budget_below_the_card_caps_the_allocator_less_the_cuda_context():
    from tinytune.config import GIB
    from tinytune.memory.estimate import CUDA_CONTEXT_BYTES
    from tinytune.memory.probe import cap_fraction

    card = 80 * GIB
    assert cap_fraction(12 * GIB, card) == (12 * GIB - CUDA_CONTEXT_BYTES) / card  # as the benchmarks capped
    assert cap_fraction(80 * GIB, card) is None and cap_fraction(96 * GIB, card) is None  # the whole card: no cap
    assert cap_fraction(CUDA_CONTEXT_BYTES // 2, card) == 0.0


@pytest.mark.parametrize("dtype,softcap,masked,packed", [
    (torch.float32, 50.0, False, False), (torch.bfloat16, 50.0, False, False), (torch.bfloat16, None, True, False),
    (torch.float32, 50.0, True, False), (torch.bfloat16, 50.0, False, True)])
def test_one_attention_tile_rebuilds_what_the_estimate_says(dtype, softcap, masked, packed):
    """Gemma 2's tiled attention: what backward saves while it rebuilds a tile (the whole sequence in
    one tile here) equals ``attention_tile_bytes`` byte for byte, beyond the q, k and v it was given
    (packed rows: the examples read from the position ids)."""
    from types import SimpleNamespace

    b, heads, kv, s, dh = 2, 4, 2, 32, 16
    gen = torch.Generator().manual_seed(0)
    # laid out as transformers' RoPE leaves them: (b, s, heads, d) in memory, seen as (b, heads, s, d)
    query, key, value = (torch.randn(b, s, n, dh, generator=gen, dtype=dtype).transpose(1, 2).requires_grad_()
                         for n in (heads, kv, kv))
    mask = torch.ones(s, s, dtype=torch.bool).tril()[None, None].expand(b, 1, s, s) if masked else None
    module = SimpleNamespace(head_dim=dh, training=True)
    positions = torch.stack([torch.arange(s) % 12, torch.arange(s) % 20]) if packed else None
    out, _ = attention.tiled_attention(module, query, key, value, mask, scaling=dh**-0.5, softcap=softcap,
                                       position_ids=positions)
    given = {t.untyped_storage().data_ptr() for t in (query, key, value, *([mask] if masked else []))}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in given:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out.sum().backward()
    shape = E.ModelShape(name="t", model_type="gemma2", layers=1, hidden=64, intermediate=128, heads=heads, kv_heads=kv,
                         head_dim=dh, vocab=256, tied=False, max_context=512, attn_softcap=softcap is not None)
    setup = E.Setup(micro_batch=b, seq_len=s, device="cuda" if dtype == torch.bfloat16 else "cpu", packed=packed)
    given_mask = s * s if masked else 0  # the estimate counts the causal mask a tile builds where it is given none
    assert sum(seen.values()) == E.attention_tile_bytes(shape, setup) - given_mask


@pytest.mark.parametrize("dtype,kv_heads,window", [(torch.float32, 2, 20), (torch.bfloat16, 2, 20),
                                                   (torch.float32, 4, 20), (torch.bfloat16, 2, 48)])
def test_a_windowed_sdpa_tile_rebuilds_what_the_estimate_says(dtype, kv_heads, window, monkeypatch):
    """A windowed SDPA layer past its window runs in tiles (16 queries here, reading up to 16 +
    window − 1 keys): the most backward holds while it rebuilds one equals ``attention_tile_bytes``
    byte for byte, beyond the q, k and v it was given (a window of 48: the last tile reads 63 keys of 64)."""
    from types import SimpleNamespace

    monkeypatch.setattr(attention, "TILE_TOKENS", 16)
    monkeypatch.setattr(E, "ATTENTION_TILE_TOKENS", 16)
    heads, s, dh = 4, 64, 16
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, s, n, dh, generator=gen, dtype=dtype).transpose(1, 2).requires_grad_()
                         for n in (heads, kv_heads, kv_heads))
    module = SimpleNamespace(head_dim=dh, training=True, num_key_value_groups=heads // kv_heads, is_causal=True)
    given = {t.untyped_storage().data_ptr() for t in (query, key, value)}
    out, _ = attention.sdpa_attention(module, query, key, value, None, scaling=dh**-0.5, sliding_window=window,
                                      position_ids=torch.arange(s)[None])
    shape = E.ModelShape(name="t", model_type="mistral", layers=1, hidden=64, intermediate=128, heads=heads,
                         kv_heads=kv_heads, head_dim=dh, vocab=256, tied=False, max_context=512,
                         sliding_window=window, sliding=(True,))
    setup = E.Setup(seq_len=s, device="cuda" if dtype == torch.bfloat16 else "cpu")
    assert _peak_live_saved_bytes(given, lambda: out.sum().backward()) == E.attention_tile_bytes(shape, setup)
