import json

import pytest
import torch

from tinytune import train
from tinytune.config import TrainConfig
from tinytune.train import make_schedule


def tiny_cfg(tiny_model_dir, demo_file, out, **kw):
    base = dict(model=str(tiny_model_dir), data=str(demo_file), out=str(out), rank=8, alpha=16, seq_len=128,
                micro_batch=4, grad_accum=2, lr=3e-3, max_steps=8, eval_fraction=0.15, sample=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_training_lowers_eval_loss_and_writes_the_run(tiny_model_dir, demo_file, tmp_path, bits):
    run_dir = train.run(tiny_cfg(tiny_model_dir, demo_file, tmp_path / "run", bits=bits), stream=open("/dev/null", "w"))
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    for key in ("step", "loss", "lr", "tokens_per_s", "rss_gib", "grad_norm"):
        assert key in steps[0]
    # A random tiny model with frozen embeddings and head moves slowly; it must still move every eval.
    assert all(b < a for a, b in zip(evals, evals[1:])) and evals[-1] < evals[0] - 0.2, evals
    plan = json.loads((run_dir / "plan.json").read_text())
    assert {plan[k] for k in ("technique", "bits", "rank", "micro_batch", "seq_len", "grad_accum")} >= {"lora", bits, 8, 4, 128, 2}
    assert TrainConfig.load(run_dir / "config.json").bits == bits
    assert (run_dir / "adapter.safetensors").is_file()
    assert (run_dir / "peft" / "adapter_config.json").is_file()


def test_same_seed_same_losses_on_cpu(tiny_model_dir, demo_file, tmp_path):
    losses = []
    for name in ("a", "b"):
        run_dir = train.run(tiny_cfg(tiny_model_dir, demo_file, tmp_path / name, max_steps=4, dropout=0.1),
                            stream=open("/dev/null", "w"))
        losses.append([r["loss"] for r in read_metrics(run_dir) if "loss" in r])
    assert losses[0] == losses[1]
    other = train.run(tiny_cfg(tiny_model_dir, demo_file, tmp_path / "c", max_steps=4, dropout=0.1, seed=1),
                      stream=open("/dev/null", "w"))
    assert [r["loss"] for r in read_metrics(other) if "loss" in r] != losses[0]


def test_max_grad_norm_0_trains_unclipped_and_still_reports_the_norm(tiny_model_dir, demo_file, tmp_path):
    runs = {}
    for norm in (0.0, 1e9, 1e-3):
        run_dir = train.run(tiny_cfg(tiny_model_dir, demo_file, tmp_path / str(norm), max_steps=3, eval_fraction=0.0,
                                     max_grad_norm=norm), stream=open("/dev/null", "w"))
        runs[norm] = [(r["loss"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r]
    assert runs[0.0] == runs[1e9]
    assert all(norm > 1e-3 for _, norm in runs[0.0])
    assert runs[1e-3][0] == runs[0.0][0] and runs[1e-3][1:] != runs[0.0][1:]  # clipping acts from the first update


def test_schedule_warms_up_then_decays():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make_schedule(opt, warmup=4, total=20)
    lrs = []
    for _ in range(20):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[3] < lrs[4] and max(lrs) == pytest.approx(1.0)
    assert lrs[-1] < 0.2 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


@pytest.mark.parametrize("optim", ["paged-adamw-32bit", "adamw"])
def test_other_optimizers_train(tiny_model_dir, demo_file, tmp_path, optim):
    run_dir = train.run(tiny_cfg(tiny_model_dir, demo_file, tmp_path / "run", optim=optim, max_steps=3,
                                 eval_fraction=0.0), stream=open("/dev/null", "w"))
    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_a_compiled_run_trains_as_an_eager_one_and_compiles_its_layers_few_times(tiny_model_dir, demo_file, tmp_path,
                                                                                monkeypatch):
    """`--compile on` (the compiler's capture and autograd split here; code generation is the GPU's):
    the same losses as eager (dropout off: compiled dropout draws other masks), with offloaded
    checkpoints and a plain last layer. Evaluation and the
    sample (the model in eval mode: other grad modes, masks, a KV cache, each a separate graph) run
    eager, so the training graphs stay well inside the compiler's recompile limit, past which a layer
    would silently run eager."""
    import functools

    from torch._dynamo.utils import counters

    from tinytune import fast

    monkeypatch.setattr(fast, "compile_layers", functools.partial(fast.compile_layers, backend="aot_eager"))
    runs = {}
    for compile_ in ("off", "on"):
        torch._dynamo.reset()
        counters.clear()
        cfg = tiny_cfg(tiny_model_dir, demo_file, tmp_path / compile_, bits=4, max_steps=4, compile=compile_,
                       sample=True, offload_checkpoints=True, plain_layers=1, dropout=0.0)
        run_dir = train.run(cfg, stream=open("/dev/null", "w"))
        runs[compile_] = [(r.get("loss"), r.get("eval_loss")) for r in read_metrics(run_dir) if "loss" in r or "eval_loss" in r]
        assert json.loads((run_dir / "plan.json").read_text())["compiled_layers"] is (compile_ == "on")
    graphs = counters["stats"]["unique_graphs"]
    assert 2 <= graphs <= 4, graphs  # with and without grad (offload's first forward), then dynamic lengths
    assert graphs < torch._dynamo.config.recompile_limit
    assert len(runs["on"]) == len(runs["off"]) == 4 + 5
    for eager, compiled in zip(runs["off"], runs["on"]):
        assert (eager[0] is None) == (compiled[0] is None)
        torch.testing.assert_close([v for v in compiled if v is not None], [v for v in eager if v is not None],
                                   rtol=1e-4, atol=0)
    torch._dynamo.reset()


def test_a_larger_gpu_acts_as_the_card_of_the_budget_and_a_smaller_one_warns(monkeypatch):
    """The decisions of the GPU cap, with the card's size and the allocator's setter stood in for."""
    from tinytune.config import GIB
    from tinytune.memory import probe
    from tinytune.memory.estimate import CUDA_CONTEXT_BYTES
    from tinytune.planner import Budget

    card, fractions, said = {}, [], []
    monkeypatch.setattr(probe, "device_total_bytes", lambda device: card["total"])
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, device=None: fractions.append(f))
    budget = Budget(12 * GIB, "cuda", "--vram 12GB")
    for total in (24 * GIB, int(11.75 * GIB), 8 * GIB):  # a 24 GB card, a "12GB" card, an 8 GB card
        card["total"] = total
        train.hold_to_budget(budget, torch.device("cuda"), said.append)
    assert fractions == [(12 * GIB - CUDA_CONTEXT_BYTES) / (24 * GIB)]
    assert said == ["memory: this process acts as a 12.00 GiB card (--vram 12GB) on a 24.00 GiB one; past that "
                    "it runs out of memory as that card would",
                    "warning: --vram 12GB is more than this GPU's 8.00 GiB; a plan that needs more runs out of "
                    "memory (the run then re-plans smaller)"]


def test_a_right_padded_micro_batch_needs_no_attention_mask(tiny_model_dir):
    """The trainer's batches (data.collate) carry no mask: attention is causal, so no real token sees
    the pads after it, and their labels are ignored. Loss and LoRA gradients equal the model's own
    with the padding mask (what the layers save without it: test_estimate)."""
    from test_memsave import _nonzero_adapters

    from tinytune import adapters, data, loading

    gen = torch.Generator().manual_seed(0)
    examples = [data.Example(ids, ids) for ids in (torch.randint(3, 2000, (n,), generator=gen).tolist() for n in (40, 17, 29))]
    batch = data.collate(examples, pad_id=2)
    mask = (torch.arange(40) < torch.tensor([[40], [17], [29]])).long()

    def grads(masked: bool):
        torch.manual_seed(0)
        model = loading.load_model(loading.resolve_source(str(tiny_model_dir)), 4, torch.device("cpu"))
        adapters.apply(model, TrainConfig(rank=4, alpha=8, dropout=0.0, bits=4))
        _nonzero_adapters(model)
        model.train()
        if masked:
            loss = model(**batch, attention_mask=mask).loss
        else:
            loss_sum, n = train.forward_loss(model, batch, torch.device("cpu"), torch.float32)
            loss = loss_sum / n
        loss.backward()
        return loss.item(), {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    want_loss, want = grads(masked=True)
    got_loss, got = grads(masked=False)
    assert "attention_mask" not in batch and got_loss == pytest.approx(want_loss, rel=1e-6)
    assert got.keys() == want.keys() and got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
