import pytest
import torch
from transformers import AutoModelForCausalLM

from tinytune import adapters, loading
from tinytune.adapters import LoRALinear
from tinytune.config import TrainConfig
from tinytune.errors import UserError


def load(tiny_model_dir, bits=16):
    return loading.load_model(loading.resolve_source(str(tiny_model_dir)), bits, torch.device("cpu"))


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapters.adapter_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft_exactly(tiny_model_dir, rslora):
    peft = pytest.importorskip("peft")
    cfg = TrainConfig(rank=4, alpha=8, dropout=0.0, rslora=rslora)
    ours = load(tiny_model_dir)
    layers = adapters.apply(ours, cfg)
    assert len(layers) == 14
    randomize_adapters(ours)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, use_rslora=rslora,
                                                       target_modules="all-linear"))
    with torch.no_grad():
        for name, layer in layers.items():
            module = theirs.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(layer.lora_A)
            module.lora_B["default"].weight.copy_(layer.lora_B)
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    n_ours = sum(p.numel() for l in layers.values() for p in l.trainable_parameters())
    assert n_ours == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def test_lora_starts_as_the_base_model_and_merges(tiny_model_dir):
    model = load(tiny_model_dir, bits=4)
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layers = adapters.apply(model, TrainConfig(rank=4, alpha=8))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # B = 0 at init
    randomize_adapters(model)
    layer = next(iter(layers.values()))
    assert isinstance(layer, LoRALinear)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.merged_weight().t(), rtol=1e-4, atol=1e-5)


def test_targets_and_rank_are_checked(tiny_model_dir):
    model = load(tiny_model_dir)
    names = adapters.target_linears(model, ("q_proj", "v_proj"))
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    with pytest.raises(UserError, match="--targets qkv matches no linear layer"):
        adapters.apply(model, TrainConfig(targets=("qkv",)))
    with pytest.raises(UserError, match="--rank 65 is larger than layer"):
        adapters.apply(model, TrainConfig(rank=65))


def test_adapter_init_depends_only_on_the_seed(tiny_model_dir):
    a = load(tiny_model_dir)
    adapters.apply(a, TrainConfig(seed=5))
    torch.randn(100)  # unrelated RNG use in between
    b = load(tiny_model_dir)
    adapters.apply(b, TrainConfig(seed=5))
    sa, sb = adapters.state(a), adapters.state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_dropout_branch_draws_the_same_mask_in_backward(compiled, dtype):
    """The fused branch equals s·(x·mask/(1-p))·Aᵀ·Bᵀ with the mask its seed gives, forward and
    gradients, and keeps x, x·Aᵀ and the seed — no mask, no dropped copy. Compiled (the partitioner
    that the GPU compiler uses, without its code generation), the mask is the index hash's and the
    compiler's partition keeps the same: x itself and nothing else d_in-wide."""
    from tinytune.adapters import branch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 48, 64, generator=gen).to(dtype).requires_grad_()
    a = (torch.randn(8, 64, generator=gen) / 8).to(dtype).requires_grad_()
    b = torch.randn(32, 8, generator=gen).to(dtype).requires_grad_()
    f = lambda x, a, b: branch.lora_branch(x, a, b, 2.0, 0.3)  # noqa: E731
    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, backend="aot_eager_decomp_partition", fullgraph=True)
    kept: list[torch.Tensor] = []
    state = torch.get_rng_state()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = f(x, a, b)
    torch.set_rng_state(state)  # the seed is the next draw of the default CPU generator
    if compiled:
        keep = branch.hashed_keep(x.detach(), 0.3, branch.draw_seed(x.device)).to(dtype)
    else:
        keep = branch._keep(x.detach(), 0.3, torch.randint(0, 2**62, (), dtype=torch.int64))
    assert 0.6 < keep.float().mean() < 0.8
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(grad)
    ref_in = [t.detach().float().requires_grad_() for t in (x, a, b)]
    ref = ((ref_in[0] * keep.float() / 0.7) @ ref_in[1].t() @ ref_in[2].t()) * 2.0
    ref.backward(grad.float())
    rel = 1e-5 if dtype == torch.float32 else 1e-2  # of the largest value: bf16 rounds in another order
    for got, want in [(out, ref)] + [(t.grad, r.grad) for t, r in zip((x, a, b), ref_in)]:
        torch.testing.assert_close(got.float(), want, rtol=0, atol=rel * want.abs().max().item())
    wide = [t for t in kept if t.dim() and t.shape[-1] == 64 and t.numel() >= x.numel()]
    assert len(wide) == 1 and wide[0] is x, [(t.shape, t.dtype) for t in kept]
    if compiled:
        torch._dynamo.reset()
