"""Every architecture tinytune loads, beyond Llama: the memory switches compute transformers' own loss
and gradients, and a 4-bit run trains and exports a model that plain transformers loads and that
computes what the adapter model does. (The memory estimate for each is checked in test_estimate.)"""

from __future__ import annotations

import pytest
import torch
from test_export import adapter_model
from test_memsave import _nonzero_adapters, _padded_batch
from test_train import tiny_cfg
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tinytune import adapters, attention, loading, memsave, train
from tinytune.config import TrainConfig
from tinytune.export import export
from tinytune.memory import estimate

OTHERS = [t for t in loading.SUPPORTED_MODEL_TYPES if t != "llama"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer_dir):
    """A 2-layer random model of each architecture (hidden 64), with the default model's tokenizer;
    windowed architectures get a window (16) shorter than the test sequences."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dirs = {}
    for model_type in OTHERS:
        config = AutoConfig.for_model(model_type, vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        if getattr(config, "sliding_window", None):
            config.sliding_window = 16
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(model_type)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tok.save_pretrained(path)
        dirs[model_type] = path
    return dirs


def own_attention(model) -> None:
    """Transformers' own attention in place of tinytune's: eager for Gemma 2, SDPA for the others."""
    eager = model.config.model_type in estimate.EAGER_ATTENTION
    model.set_attn_implementation("eager" if eager else "sdpa")


def _grads(model_dir, setup) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = loading.load_model(loading.resolve_source(str(model_dir)), 4, torch.device("cpu"))
    adapters.apply(model, TrainConfig(technique="lora", rank=4, alpha=8, dropout=0.0, bits=4))
    _nonzero_adapters(model)
    model.train()
    batch = _padded_batch()
    if setup is None:  # transformers' own loss with the padding mask, the whole model plain, its own attention
        own_attention(model)
        loss = model(**batch).loss
    else:  # the trainer's batch: right-padded, no mask (data.collate)
        setup(model)
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        loss_sum, n = train.forward_loss(model, batch, torch.device("cpu"), torch.float32)
        loss = loss_sum / n
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("model_type", OTHERS)
def test_the_memory_switches_give_transformers_own_loss_and_gradients(model_dirs, model_type, monkeypatch):
    """Offloaded checkpoints, a tiled MLP and a plain last layer, with tinytune's chunked loss (Gemma
    2's soft-capped logits included; its attention in tiles of 16 queries, windowed layers of 16) on
    a right-padded batch without its mask, against the model's own forward and loss with the mask."""
    monkeypatch.setattr(attention, "TILE_TOKENS", 16)
    want_loss, want = _grads(model_dirs[model_type], None)
    got_loss, got = _grads(model_dirs[model_type], lambda m: (memsave.checkpoint_layers(m, offload=True, plain_layers=1),
                                                              memsave.tile_mlp(m, 3)))
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert got.keys() == want.keys() and got
    for key in want:
        assert want[key].abs().sum() > 0, key
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("model_type", OTHERS)
def test_a_4bit_run_trains_and_exports_what_the_adapter_model_computes(model_dirs, model_type, demo_file, tmp_path):
    run_dir = train.run(tiny_cfg(model_dirs[model_type], demo_file, tmp_path / "run", bits=4, max_steps=3, dropout=0.0,
                                 eval_fraction=0.0), stream=open("/dev/null", "w"))
    out = export(run_dir, tmp_path / "merged", dtype="fp32", say=lambda _s: None)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 2000, (2, 24), generator=torch.Generator().manual_seed(0))
    base = loading.load_model(loading.resolve_source(str(model_dirs[model_type])), 4, torch.device("cpu")).eval()
    with torch.no_grad():
        want = adapter_model(run_dir)(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        before = base(input_ids=ids).logits
    assert (want - before).abs().max() > 1e-3  # training moved the model
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", loading.SUPPORTED_MODEL_TYPES)
def test_benchmarks_build_each_architecture_straight_into_4bit(model_dirs, model_type, tiny_model_dir):
    """``build_random`` (the benchmarks' real shapes without weights on disk) makes a 4-bit model whose
    buffers (RoPE frequencies, Gemma's embedding scale) are the ones transformers computes, and
    which runs."""
    path = tiny_model_dir if model_type == "llama" else model_dirs[model_type]
    config = AutoConfig.from_pretrained(path)
    model = loading.build_random(config, 4, torch.device("cpu"), torch.float32)
    reference = AutoModelForCausalLM.from_config(config)
    buffers = dict(model.named_buffers())
    for name, b in reference.named_buffers():
        torch.testing.assert_close(buffers[name], b, msg=name)
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(3, 40).view(1, -1)).logits).all()


def test_gemma2_runs_tiled_attention_that_computes_and_generates_as_eager(model_dirs, monkeypatch):
    """Loading gives Gemma 2 query-tiled attention (tinytune.attention); in tiles of 16 queries over
    48 tokens, with windowed layers of 16 and packed rows, its logits equal eager attention's, and
    greedy generation with a KV cache gives the same tokens."""
    monkeypatch.setattr(attention, "TILE_TOKENS", 16)
    source = loading.resolve_source(str(model_dirs["gemma2"]))
    tiled, eager = (loading.load_model(source, 16, torch.device("cpu")) for _ in range(2))
    eager.set_attn_implementation("eager")
    assert tiled.config._attn_implementation == attention.TILED
    ids = torch.randint(3, 2000, (2, 48), generator=torch.Generator().manual_seed(0))
    packed = torch.cat([torch.arange(20), torch.arange(28)]).expand(2, -1)
    with torch.no_grad():
        for positions in (None, packed):
            torch.testing.assert_close(tiled(input_ids=ids, position_ids=positions).logits,
                                       eager(input_ids=ids, position_ids=positions).logits, rtol=1e-5, atol=1e-5)
    runs = [m.generate(ids[:1, :20], max_new_tokens=30, min_new_tokens=30, do_sample=False, use_cache=True, pad_token_id=0)
            for m in (tiled, eager)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("model_type", loading.SUPPORTED_MODEL_TYPES)
def test_packed_rows_attend_per_example_with_transformers_own_loss_and_gradients(model_dirs, tiny_model_dir,
                                                                                  model_type, monkeypatch):
    """A run that packs (``attention.install(packed=True)``, tiles of 16 queries) on rows of three
    examples, some longer than the windows of 16, with offloaded checkpoints: the loss and LoRA
    gradients of transformers' own masked attention (eager for Gemma 2), and no layer gets a mask."""
    monkeypatch.setattr(attention, "TILE_TOKENS", 16)
    path = tiny_model_dir if model_type == "llama" else model_dirs[model_type]
    ids = torch.randint(3, 2000, (2, 48), generator=torch.Generator().manual_seed(0))
    positions = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in ((20, 5, 23), (9, 30, 9))])
    batch = {"input_ids": ids, "labels": ids, "position_ids": positions}
    masks = []

    def run(ours: bool) -> tuple[float, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = loading.load_model(loading.resolve_source(str(path)), 4, torch.device("cpu"))
        adapters.apply(model, TrainConfig(technique="lora", rank=4, alpha=8, dropout=0.0, bits=4))
        _nonzero_adapters(model)
        model.train()
        if ours:
            attention.install(model, packed=True)
            memsave.checkpoint_layers(model, offload=True)
            for layer in loading.decoder_layers(model):
                layer.self_attn.register_forward_pre_hook(
                    lambda _m, _a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
        else:
            own_attention(model)
        loss_sum, n = train.forward_loss(model, batch, torch.device("cpu"), torch.float32)
        (loss_sum / n).backward()
        return (loss_sum / n).item(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}

    want_loss, want = run(False)
    got_loss, got = run(True)
    assert got_loss == pytest.approx(want_loss, rel=1e-6)
    assert got.keys() == want.keys() and got
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert masks and all(m is None for m in masks)
