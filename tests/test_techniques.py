"""LoRA-FA, VeRA, Delta-LoRA and LoRA+: each checked against PEFT or a literal reference."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tinytune import adapters, loading
from tinytune.adapters import DeltaLoRALinear
from tinytune.config import TrainConfig
from tinytune.errors import UserError
from tinytune.memory import probe

IDS = torch.randint(0, 2000, (2, 16), generator=torch.Generator().manual_seed(0))


def load(tiny_model_dir, bits=16):
    return loading.load_model(loading.resolve_source(str(tiny_model_dir)), bits, torch.device("cpu"))


def saved_activation_bytes(model, ids) -> int:
    def step():
        model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()

    return probe.saved_activation_bytes(model, step)


@pytest.mark.parametrize("bits", [16, 4])
def test_lora_fa_saves_less_by_what_the_shapes_predict(tiny_model_dir, bits):
    results = {}
    for technique in ("lora", "lora-fa"):
        model = load(tiny_model_dir, bits)
        model.train()
        adapters.apply(model, TrainConfig(technique=technique, rank=4, dropout=0.0))
        results[technique] = saved_activation_bytes(model, IDS)
    c = model.config
    tokens = IDS.numel()
    # LoRA keeps each distinct adapted-layer input for A's gradient: the attention input (shared by
    # q, k, v), the MLP input (shared by gate, up) and down_proj's input, in fp32. o_proj's input is
    # the attention output, which SDPA saves for its own backward under either technique.
    per_layer = c.hidden_size + c.hidden_size + c.intermediate_size
    predicted = tokens * per_layer * c.num_hidden_layers * 4
    saved = results["lora"] - results["lora-fa"]
    assert abs(saved - predicted) <= 0.05 * predicted, (results, predicted)


def test_lora_fa_trains_only_b(tiny_model_dir):
    model = load(tiny_model_dir)
    layers = adapters.apply(model, TrainConfig(technique="lora-fa", rank=4))
    names = {n for layer in layers.values() for n, p in layer.named_parameters(recurse=False) if p.requires_grad}
    assert names == {"lora_B"}
    assert "model.layers.0.self_attn.q_proj.lora_A" in adapters.state(model)  # frozen A is saved for export


def test_vera_matches_peft(tiny_model_dir):
    peft = pytest.importorskip("peft")
    cfg = TrainConfig(technique="vera", rank=8, dropout=0.0, seed=3)
    ours = load(tiny_model_dir)
    layers = adapters.apply(ours, cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in layers.values():
            layer.vera_lambda_b.copy_(torch.randn(layer.vera_lambda_b.shape, generator=g) * 0.1)
            layer.vera_lambda_d.copy_(torch.randn(layer.vera_lambda_d.shape, generator=g))
    n_trainable = sum(p.numel() for p in adapters.trainable(ours))
    assert n_trainable == sum(layer.out_features + 8 for layer in layers.values())

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    theirs = peft.get_peft_model(base, peft.VeraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"],
                                                      vera_dropout=0.0))
    shared = ours.tinytune_shared
    with torch.no_grad():
        for name, layer in layers.items():
            module = theirs.base_model.model.get_submodule(name)
            module.vera_A["default"].copy_(shared["vera_A"])
            module.vera_B["default"].copy_(shared["vera_B"])
            module.vera_lambda_b["default"].copy_(layer.vera_lambda_b)
            module.vera_lambda_d["default"].copy_(layer.vera_lambda_d)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    assert n_trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    layer = next(iter(layers.values()))
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ layer.merged_weight().t(), rtol=1e-4, atol=1e-5)


def test_vera_shared_matrices_are_saved_and_restored(tiny_model_dir):
    a = load(tiny_model_dir)
    adapters.apply(a, TrainConfig(technique="vera", rank=8, seed=1))
    saved = adapters.state(a)
    assert {"shared.vera_A", "shared.vera_B"} <= saved.keys()
    b = load(tiny_model_dir)
    adapters.apply(b, TrainConfig(technique="vera", rank=8, seed=2))  # different draw...
    adapters.load_state(b, saved)  # ...replaced by the saved one
    assert torch.equal(b.tinytune_shared["vera_A"], a.tinytune_shared["vera_A"])
    with pytest.raises(UserError, match="larger than VeRA's shared matrices allow"):
        adapters.apply(load(tiny_model_dir), TrainConfig(technique="vera", rank=200))


def test_delta_lora_matches_a_literal_w_update(tiny_model_dir):
    """Reference: a 16-bit W rewritten after every step past K. Ours: W untouched, telescoped forward."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24, bias=False)
    ours = DeltaLoRALinear(torch.nn.Linear(32, 24, bias=False), rank=4, alpha=8, delta_lambda=2.0, start_step=3)
    ours.base.load_state_dict(base.state_dict())
    ours.base.requires_grad_(False)
    ref_w = base.weight.detach().clone()
    ref_a, ref_b = ours.lora_A.detach().clone().requires_grad_(), ours.lora_B.detach().clone().requires_grad_()
    opt_ours = torch.optim.AdamW([ours.lora_A, ours.lora_B], lr=1e-2)
    opt_ref = torch.optim.AdamW([ref_a, ref_b], lr=1e-2)
    s = ours.scaling
    g = torch.Generator().manual_seed(1)
    for step in range(1, 13):
        x, y = torch.randn(8, 32, generator=g), torch.randn(8, 24, generator=g)
        ((ours(x) - y) ** 2).mean().backward()
        opt_ours.step()
        opt_ours.zero_grad()
        ours.on_optimizer_step(step)

        before = (ref_b @ ref_a).detach().clone()
        ((x @ ref_w.t() + s * (x @ ref_a.t()) @ ref_b.t() - y) ** 2).mean().backward()
        opt_ref.step()
        opt_ref.zero_grad()
        if step > 3:  # W(t+1) = W(t) + λ·s·(B(t+1)A(t+1) − B(t)A(t)) after K = 3 steps
            ref_w += 2.0 * s * ((ref_b @ ref_a).detach() - before)
    x = torch.randn(5, 32, generator=g)
    with torch.no_grad():
        want = x @ ref_w.t() + s * (x @ ref_a.t()) @ ref_b.t()
        # fp32 throughout; the two sides sum the same terms in another order over 12 steps
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.merged_weight(), ref_w + s * ref_b @ ref_a, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ref_w, base.weight)  # W really moved in the reference
    torch.testing.assert_close(ours.base.weight, base.weight)  # and never in ours


def test_lora_plus_groups_like_peft(tiny_model_dir):
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    cfg = TrainConfig(technique="lora-plus", rank=4, lr=1e-4, lora_plus_ratio=16)
    ours = load(tiny_model_dir)
    layers = adapters.apply(ours, cfg)
    groups = adapters.param_groups(ours, cfg)

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear"))
    import bitsandbytes as bnb

    opt = create_loraplus_optimizer(theirs, bnb.optim.PagedAdamW8bit, lr=1e-4, loraplus_lr_ratio=16)
    theirs_by_lr = {}
    names = {id(p): n for n, p in theirs.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            short = names[id(p)].replace("base_model.model.", "").replace(".default", "").removesuffix(".weight")
            theirs_by_lr.setdefault(group["lr"], set()).add(short)
    ours_names = {id(p): f"{n}.{k}" for n, layer in layers.items() for k, p in layer.named_parameters(recurse=False)}
    ours_by_lr = {g["lr"]: {ours_names[id(p)] for p in g["params"]} for g in groups}
    assert ours_by_lr == {k: v for k, v in theirs_by_lr.items() if v}
    assert set(ours_by_lr) == {1e-4, 16e-4}


@pytest.mark.parametrize("technique", ["lora-fa", "vera", "delta-lora", "lora-plus"])
def test_each_technique_trains_on_4bit_and_exports_exactly(technique, tiny_model_dir, demo_file, tmp_path):
    from tinytune import rundir, train
    from tinytune.export import export

    from test_train import read_metrics, tiny_cfg

    extra = {"rank": 32, "lr": 1e-2} if technique == "vera" else {}
    cfg = tiny_cfg(tiny_model_dir, demo_file, tmp_path / "run", technique=technique, bits=4, delta_start=2, **extra)
    run_dir = train.run(cfg, stream=open("/dev/null", "w"))
    evals = [r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r]
    assert evals[-1] < evals[0], evals
    out = export(run_dir, tmp_path / "merged", dtype="fp32", say=lambda _s: None)
    model = loading.load_model(loading.resolve_source(cfg.model), 4, torch.device("cpu"))
    adapters.apply(model, cfg, total_steps=cfg.max_steps)
    adapters.load_state(model, rundir.load_tensors(run_dir / "adapter.safetensors"))
    if technique == "delta-lora":
        assert all(bool(layer.active) for layer in adapters.adapter_layers(model).values())
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits, rtol=1e-4, atol=1e-4)


def test_full_fine_tuning_trains_every_weight_and_exports(tiny_model_dir, demo_file, tmp_path):
    from tinytune import train
    from tinytune.export import export

    from test_train import read_metrics, tiny_cfg

    cfg = tiny_cfg(tiny_model_dir, demo_file, tmp_path / "run", technique="full", lr=1e-3, bits=None)
    assert cfg.bits == 16
    run_dir = train.run(cfg, stream=open("/dev/null", "w"))
    evals = [r["eval_loss"] for r in read_metrics(run_dir) if "eval_loss" in r]
    assert all(b < a for a, b in zip(evals, evals[1:])) and evals[-1] < evals[0] - 0.5, evals
    plan_params = json.loads((run_dir / "plan.json").read_text())["trainable_params"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert plan_params == sum(p.numel() for p in base.parameters())
    out = export(run_dir, tmp_path / "merged", dtype="fp32", say=lambda _s: None)
    tuned = AutoModelForCausalLM.from_pretrained(out).eval()
    from tinytune import rundir

    weights = rundir.load_tensors(run_dir / "adapter.safetensors")
    torch.testing.assert_close(tuned.model.layers[0].mlp.down_proj.weight, weights["model.layers.0.mlp.down_proj.weight"])
    assert not torch.equal(tuned.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("bits", [4, 8])
def test_full_fine_tuning_refuses_quantized_bits(bits):
    with pytest.raises(UserError, match=f"--technique full with --bits {bits}"):
        TrainConfig(technique="full", bits=bits)


def test_vera_scaling_b_first_gives_the_papers_output_and_gradients():
    """Λb scaling B's rows before the product (what a layer wider than the rank does, to keep an
    r-wide tensor for Λb's gradient) computes what Λb·(B·Λd·A·x) does, gradients included."""
    from tinytune.adapters.vera import VeRALinear, shared_matrices

    torch.manual_seed(0)
    layer = VeRALinear(torch.nn.Linear(64, 160, bias=False).requires_grad_(False), shared_matrices(8, 160, 160, 0, "cpu"))
    assert layer.fold_b
    with torch.no_grad():
        layer.vera_lambda_b.normal_()
        layer.vera_lambda_d.normal_()
    x = torch.randn(3, 5, 64, requires_grad=True)
    grad = torch.randn(3, 5, 160)
    results = []
    for fold in (True, False):
        layer.fold_b = fold
        x.grad = layer.vera_lambda_b.grad = layer.vera_lambda_d.grad = None
        y = layer(x)
        y.backward(grad)
        results.append((y.detach(), x.grad, layer.vera_lambda_b.grad, layer.vera_lambda_d.grad))
    for folded, paper in zip(*results):
        torch.testing.assert_close(folded, paper, rtol=1e-5, atol=1e-6)
