"""Offloaded checkpoints and the tiled MLP compute the same gradients as plain training."""

from __future__ import annotations

import json
import re
import sys
import weakref
from pathlib import Path

import pytest
import torch

from tinytune import adapters, fast, loading, memsave, train
from tinytune.config import TrainConfig

IDS = torch.randint(3, 2000, (2, 48), generator=torch.Generator().manual_seed(0))
TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _nonzero_adapters(model) -> None:
    with torch.no_grad():  # B starts at zero: give it values so every path carries gradient
        for p in adapters.trainable(model):
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))


def _padded_batch() -> dict[str, torch.Tensor]:
    mask = torch.ones_like(IDS)
    mask[1, 30:] = 0  # a padded row
    return {"input_ids": IDS, "attention_mask": mask, "labels": IDS.masked_fill(mask == 0, -100)}


def lora_grads(tiny_model_dir, bits: int, setup, dropout: float = 0.0, technique: str = "lora") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = loading.load_model(loading.resolve_source(str(tiny_model_dir)), bits, torch.device("cpu"))
    cfg = TrainConfig(technique=technique, rank=4, alpha=8, dropout=dropout, bits=bits)
    adapters.apply(model, cfg)
    _nonzero_adapters(model)
    setup(model)
    model.train()
    loss_sum, n = train.forward_loss(model, _padded_batch(), torch.device("cpu"), torch.float32)
    (loss_sum / n).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


SETUPS = {
    "checkpointing": memsave.enable_checkpointing,
    "offloaded checkpoints": memsave.offload_checkpoints,
    "tiled MLP": lambda m: (memsave.enable_checkpointing(m), memsave.tile_mlp(m, 3)),
    "offloaded + tiled": lambda m: (memsave.offload_checkpoints(m), memsave.tile_mlp(m, 4)),
    "tiled MLP without checkpointing": lambda m: memsave.tile_mlp(m, 3),
    "checkpointing, last layer plain": lambda m: (memsave.enable_checkpointing(m), memsave.plain_last_layers(m, 1)),
    "offloaded, last layer plain": lambda m: (memsave.offload_checkpoints(m), memsave.plain_last_layers(m, 1)),
    # the compiler's graph capture and autograd split, without code generation (CPU, fast)
    "compiled layers": lambda m: (memsave.enable_checkpointing(m), fast.compile_layers(m, backend="aot_eager")),
    "compiled + offloaded + tiled": lambda m: (memsave.offload_checkpoints(m), memsave.tile_mlp(m, 3),
                                               fast.compile_layers(m, backend="aot_eager")),
}


@pytest.mark.parametrize("bits", [4, 16])
@pytest.mark.parametrize("name", list(SETUPS))
def test_same_gradients_as_plain(tiny_model_dir, bits, name):
    plain = lora_grads(tiny_model_dir, bits, lambda m: None)
    other = lora_grads(tiny_model_dir, bits, SETUPS[name])
    assert plain.keys() == other.keys() and len(plain) == 2 * 14
    for key in plain:
        assert plain[key].abs().sum() > 0, key
        torch.testing.assert_close(other[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("technique,bits", [("lora-fa", 4), ("vera", 4), ("delta-lora", 4), ("lora-plus", 8),
                                            ("full", 16)])
def test_every_technique_gets_the_same_gradients_checkpointed(tiny_model_dir, technique, bits):
    """Reentrant checkpointing recomputes each layer with grad and runs its backward inside the
    recomputation: every trainable tensor (LoRA-FA's B under its own inner checkpoint, VeRA's
    vectors, the full model's weights and embeddings) gets the gradient of plain training."""
    plain = lora_grads(tiny_model_dir, bits, lambda m: None, technique=technique)
    other = lora_grads(tiny_model_dir, bits, SETUPS["checkpointing"], technique=technique)
    assert plain.keys() == other.keys() and plain
    for key in plain:
        torch.testing.assert_close(other[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)


TILED = {"tiled MLP": 3, "offloaded + tiled": 4}


@pytest.mark.parametrize("name", ["checkpointing", "offloaded checkpoints", "compiled layers", *TILED])
def test_recomputed_layers_draw_the_same_dropout_masks(tiny_model_dir, name):
    """LoRA's dropout draws its mask from the CPU generator in forward and again in backward; a
    recomputed layer (the generator restored by checkpointing) must draw the same ones as its first
    forward did. A tiled MLP draws per tile (a different, equally valid mask than the whole
    sequence's), in the first forward as in the recomputation: its reference is tiled alike, without
    checkpointing. Compiled layers draw the index hash's masks: their reference is compiled too."""
    compiled = "compiled" in name
    reference = ((lambda m: fast.compile_layers(m, backend="aot_eager")) if compiled
                 else (lambda m: memsave.tile_mlp(m, TILED[name])) if name in TILED else lambda m: None)
    plain = lora_grads(tiny_model_dir, 4, reference, dropout=0.2)
    other = lora_grads(tiny_model_dir, 4, SETUPS[name], dropout=0.2)
    no_dropout = lora_grads(tiny_model_dir, 4, lambda m: None)
    assert any(not torch.allclose(plain[k], no_dropout[k]) for k in plain)  # dropout is really on
    for key in plain:
        torch.testing.assert_close(other[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)
    torch._dynamo.reset()


@pytest.mark.parametrize("offload", [False, True])
def test_tiled_mlp_never_builds_an_intermediate_for_the_whole_sequence(tiny_model_dir, offload):
    """Every tensor as wide as the MLP's intermediate, in forward (which offloading's reentrant
    checkpointing runs without grad) and in backward, covers one tile of the sequence at most."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widths(TorchDispatchMode):
        """The sequence length of every new (batch, seq, width) tensor an operation makes."""

        def __init__(self, width: int) -> None:
            super().__init__()
            self.width, self.lengths = width, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if (isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[-1] == self.width
                        and t.untyped_storage().data_ptr() not in inputs):  # views make nothing new
                    self.lengths.append(t.shape[-2])
            return out

    torch.manual_seed(0)
    model = loading.load_model(loading.resolve_source(str(tiny_model_dir)), 4, torch.device("cpu"))
    adapters.apply(model, TrainConfig(rank=4, alpha=8, dropout=0.1, bits=4))
    memsave.offload_checkpoints(model) if offload else memsave.enable_checkpointing(model)
    memsave.tile_mlp(model, 4)
    model.train()
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}
    forward, backward = Widths(model.config.intermediate_size), Widths(model.config.intermediate_size)
    with forward:
        loss_sum, n = train.forward_loss(model, batch, torch.device("cpu"), torch.float32)
    with backward:
        (loss_sum / n).backward()
    tile = IDS.shape[1] // 4
    assert max(forward.lengths) == tile and max(backward.lengths) == tile


def test_compiled_layers_are_captured_without_graph_breaks(tiny_model_dir):
    """Checkpointing and offloading stay outside the compiled layer; the tiled MLP's pieces and LoRA's
    dropout (its seed, index hash and checkpointed masking) are traced: nothing breaks a graph."""
    from torch._dynamo.utils import counters

    counters.clear()
    torch._dynamo.reset()
    lora_grads(tiny_model_dir, 4, SETUPS["compiled + offloaded + tiled"], dropout=0.1)  # dropout: traced, no graph break
    assert counters["stats"]["unique_graphs"] >= 2 and counters["frames"]["ok"] == counters["frames"]["total"]
    assert not counters["graph_break"], list(counters["graph_break"])
    torch._dynamo.reset()


def test_compiled_layers_trace_4bit_layers_unless_told_not_to(tiny_model_dir):
    """Compiled layers run their 4-bit layers as tensor operations; the benchmarks' ``+bnb4`` variant
    keeps bitsandbytes' operators, to measure the difference in one run."""
    from tinytune import quant

    def traced(**kw) -> list[bool]:
        model = loading.load_model(loading.resolve_source(str(tiny_model_dir)), 4, torch.device("cpu"))
        fast.compile_layers(model, backend="aot_eager", **kw)
        return [isinstance(m, quant.Traceable4bit) for m in model.modules() if quant.quantized_bits(m) == 4]

    assert traced() == [True] * 14 and traced(traced_4bit=False) == [False] * 14
    spec = _tool("bench_vs_peft").spec_of("tinytune+plain0+bnb4")
    assert spec["traced_4bit"] is False and spec["plain_layers"] == 0


@pytest.mark.parametrize("name", ["compiled layers", "compiled + offloaded + tiled"])
def test_a_compiled_layer_is_entered_once_per_pass(tiny_model_dir, name):
    """Each entry into compiled code costs the CPU guard checks and a runtime wrapper: a checkpointed
    layer enters it once in forward and once when backward recomputes it, nothing more."""
    from torch.profiler import profile

    torch._dynamo.reset()
    lora_grads(tiny_model_dir, 4, SETUPS[name])  # compiles
    with profile() as prof:
        lora_grads(tiny_model_dir, 4, SETUPS[name])
    entries = [e for e in prof.events() if e.name.startswith("Torch-Compiled Region")]
    layers = json.loads((Path(tiny_model_dir) / "config.json").read_text())["num_hidden_layers"]
    assert len(entries) == 2 * layers
    torch._dynamo.reset()


def test_a_compiled_layer_stays_compiled_across_a_runs_micro_batch_shapes(tiny_model_dir, monkeypatch):
    """Grad on and off (reentrant checkpointing's two passes), masked and unmasked micro-batches,
    lengths and batch sizes that change: more graphs than the compiler's default limit of 8, past
    which a new case would run eager. The last case still enters compiled code in every pass."""
    from torch._dynamo.utils import counters
    from torch.profiler import profile

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # the compiler's default
    model = loading.load_model(loading.resolve_source(str(tiny_model_dir)), 4, torch.device("cpu"))
    adapters.apply(model, TrainConfig(rank=4, alpha=8, dropout=0.0, bits=4))
    memsave.enable_checkpointing(model)
    fast.compile_layers(model, backend="eager")  # the compiler's capture and guards only: fast
    model.train()
    layers = len(loading.decoder_layers(model))

    def step(batch: int, length: int, padded: bool) -> None:
        ids = torch.randint(3, 2000, (batch, length), generator=torch.Generator().manual_seed(length))
        mask = torch.ones_like(ids)
        if padded:
            mask[-1, length // 2:] = 0
        loss_sum, n = train.forward_loss(model, {"input_ids": ids, "attention_mask": mask,
                                                 "labels": ids.masked_fill(mask == 0, -100)},
                                         torch.device("cpu"), torch.float32)
        (loss_sum / n).backward()

    for case in [(2, 40, True), (2, 40, False), (2, 48, True), (2, 48, False)]:
        step(*case)
    with profile() as prof:
        step(1, 30, False)
    assert counters["stats"]["unique_graphs"] > 8
    assert len([e for e in prof.events() if e.name.startswith("Torch-Compiled Region")]) == 2 * layers
    torch._dynamo.reset()


def _offloaded_lora_model(tiny_model_dir):
    torch.manual_seed(0)
    model = loading.load_model(loading.resolve_source(str(tiny_model_dir)), 16, torch.device("cpu"))
    adapters.apply(model, TrainConfig(rank=4, alpha=8, dropout=0.0, bits=16))
    memsave.offload_checkpoints(model)
    model.train()
    return model


def test_offload_keeps_only_host_copies_of_layer_inputs_and_fetches_each_ahead(tiny_model_dir, monkeypatch):
    """Under offloading, what autograd keeps between forward and backward for the decoder layers is
    a host copy of their inputs; nothing of a layer's inside survives the forward. Backward takes
    them back last first, and every one but the first has been fetched already, by the layer after."""
    model = _offloaded_lora_model(tiny_model_dir)
    events = []
    cls = memsave.HostCopies
    pack, fetch, unpack = cls.pack, cls._fetch, cls.unpack

    def spy_pack(self, t):
        saved = pack(self, t)
        events.append(("pack", saved, tuple(t.shape), t.data_ptr()))
        return saved

    monkeypatch.setattr(cls, "pack", spy_pack)
    monkeypatch.setattr(cls, "_fetch", lambda self, s: (events.append(("fetch", s)), fetch(self, s))[1])
    monkeypatch.setattr(cls, "unpack", lambda self, s: (events.append(("unpack", s, s.fetched is not None)),
                                                       unpack(self, s))[1])
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}
    loss_sum, n = train.forward_loss(model, batch, torch.device("cpu"), torch.float32)
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    packed = [e for e in events if e[0] == "pack"]
    assert [e[2] for e in packed] == [(2, 48, hidden)] * layers  # one input per layer, nothing else
    assert all(e[1].host.data_ptr() != e[3] for e in packed)  # copies, not the tensors themselves
    (loss_sum / n).backward()
    unpacked = [e for e in events if e[0] == "unpack"]
    assert [e[1] for e in unpacked] == [e[1] for e in reversed(packed)]
    assert [e[2] for e in unpacked] == [False] + [True] * (layers - 1)
    fetched = [e[1] for e in events if e[0] == "fetch"]
    assert fetched == [e[1] for e in reversed(packed)]  # each once, in the order backward needs them


def test_an_abandoned_offloaded_step_frees_its_copies_and_the_next_step_is_exact(tiny_model_dir, monkeypatch):
    """Out of memory in the middle of a forward leaves copies of the first layers' inputs behind;
    they go with the failed step's graph, and the retried step computes plain training's gradients."""
    plain = lora_grads(tiny_model_dir, 16, lambda m: None)
    packed = []
    pack = memsave.HostCopies.pack

    def spy_pack(self, t):
        saved = pack(self, t)
        packed.append(weakref.ref(saved))
        return saved

    monkeypatch.setattr(memsave.HostCopies, "pack", spy_pack)
    model = _offloaded_lora_model(tiny_model_dir)
    _nonzero_adapters(model)
    copies = model.model.layers[0]._gradient_checkpointing_func.keywords["copies"]
    mlp = model.model.layers[1].mlp
    real = mlp.forward
    mlp.forward = lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("injected"))
    batch = _padded_batch()
    with pytest.raises(torch.OutOfMemoryError):
        train.forward_loss(model, batch, torch.device("cpu"), torch.float32)
    mlp.forward = real
    assert len(packed) == 1 and all(ref() is None for ref in packed)  # layer 0 had packed
    loss_sum, n = train.forward_loss(model, batch, torch.device("cpu"), torch.float32)
    layers = model.config.num_hidden_layers
    chain, link = [], copies.last  # what backward will fetch: the new step's copies, and nothing older
    while link is not None and (saved := link()) is not None:
        chain.append(saved)
        link = saved.before
    assert len(packed) == 1 + layers and chain == [ref() for ref in reversed(packed[1:])]
    (loss_sum / n).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_plain_last_layers_run_once_and_the_others_twice(tiny_model_dir):
    """With one plain layer, the last decoder layer's forward runs once per step, with grad; the
    checkpointed ones run first without grad (reentrant checkpointing: no autograd graph, no
    saved-tensor hook per tensor) and again with it in backward. All plain would be the same as no
    checkpointing."""
    calls: dict[int, list[bool]] = {}

    def record(model):
        memsave.enable_checkpointing(model)
        memsave.plain_last_layers(model, 1)
        for i, layer in enumerate(loading.decoder_layers(model)):
            layer.self_attn.register_forward_hook(lambda *_, i=i: calls.setdefault(i, []).append(torch.is_grad_enabled()))

    lora_grads(tiny_model_dir, 16, record)
    last = max(calls)
    assert calls[last] == [True] and all(calls[i] == [False, True] for i in range(last)), calls


def test_the_estimator_knows_plain_layers():
    """A plain layer keeps its whole saved set instead of its input; the rebuilt layer no longer adds
    to the peak once the plain layers' sets outweigh it (they are freed before any rebuild)."""
    from tinytune import presets
    from tinytune.memory.estimate import Setup, estimate, layer_saved_bytes_per_token

    shape = presets.model_shape("llama-3.1-8b")
    tokens = 2048
    per_layer = layer_saved_bytes_per_token(shape, Setup(seq_len=tokens)) * tokens
    layer_input = 2 * shape.hidden * tokens
    base = estimate(shape, Setup(seq_len=tokens))
    for k in (1, 5, 31):
        est = estimate(shape, Setup(seq_len=tokens, plain_layers=k))
        grown = est.components["activations"] - base.components["activations"]
        assert grown == pytest.approx(k * (per_layer - layer_input), abs=2)
        assert "the last" in est.notes["activations"]
    assert estimate(shape, Setup(seq_len=tokens, plain_layers=32)).components["activations"] == pytest.approx(
        estimate(shape, Setup(seq_len=tokens, gradient_checkpointing=False)).components["activations"], abs=2)
    # offloaded: the one plain layer's set is gone before the first rebuild, which peaks as high;
    # a second plain layer adds its set less the inputs a rebuild has on the GPU (memsave.FETCHES_AHEAD)
    off = [estimate(shape, Setup(seq_len=tokens, offload=True, plain_layers=k, loss_chunk=64)).peak for k in (0, 1, 2)]
    assert off[1] == off[0] and off[2] - off[1] == pytest.approx(per_layer - 3 * layer_input, abs=2)


def test_the_estimator_knows_both_switches():
    from tinytune import presets
    from tinytune.memory.estimate import Setup, estimate, host_offload_bytes

    shape = presets.model_shape("llama-3.1-8b")
    base = Setup(seq_len=16384, gradient_checkpointing=True)
    plain = estimate(shape, base)
    off = estimate(shape, Setup(seq_len=16384, gradient_checkpointing=True, offload=True))
    inputs = shape.layers * 2 * shape.hidden * 16384
    assert plain.components["activations"] - off.components["activations"] == inputs
    assert host_offload_bytes(shape, off.setup) == inputs and "offloaded to host" in off.notes["activations"]
    tiled = estimate(shape, Setup(seq_len=16384, gradient_checkpointing=True, mlp_tiles=8))
    # 7/8 of what a rebuilt MLP keeps (gate, silu(gate), up; the inputs of its LoRA branches, x·A of
    # each) and of the intermediates' gradients go; each tile's checkpoint keeps its input
    h, i, r, n = shape.hidden, shape.intermediate, base.rank, 16384
    rebuilt_mlp = 2 * (3 * i + h + i + 3 * r) * n
    saved = (rebuilt_mlp + 2 * 3 * i * n) * 7 / 8 - 2 * h * n
    assert plain.components["backward working set"] - tiled.components["backward working set"] == pytest.approx(saved, rel=1e-6)


def test_a_run_with_both_switches(tiny_model_dir, demo_file, tmp_path):
    import json

    from tinytune.cli import main

    out = tmp_path / "run"
    assert main(["--model", str(tiny_model_dir), "--data", str(demo_file), "--out", str(out), "--max-steps", "2",
                 "--rank", "4", "--seq-len", "128", "--no-sample", "--offload-checkpoints", "--mlp-tiles", "2",
                 "--vram", "2GB"]) == 0
    config = json.loads((out / "config.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert config["offload_checkpoints"] and config["mlp_tiles"] == 2 and config["gradient_checkpointing"]
    assert plan["offload_checkpoints"] and plan["mlp_tiles"] == 2 and plan["gradient_checkpointing"]


@pytest.mark.parametrize("stack", ["peft", "tinytune"])
def test_bench_vs_peft_smoke_runs_both_stacks_on_cpu(stack):
    """The comparison benchmark's code path (the PEFT recipe and ours on one random NF4 model) works
    without a GPU (it measures nothing there)."""
    import json
    import subprocess
    import sys

    bench = TOOLS / "bench_vs_peft.py"
    spec = {"stack": stack, "model": "llama-3.1-8b", "seq": 64, "steps": 1, "smoke": True}
    proc = subprocess.run([sys.executable, str(bench), "--one", json.dumps(spec)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["oom"] is False and result["tokens_per_s"] > 0


def test_bench_overhead_prints_host_time_per_stack():
    """The host-overhead proxy runs its stacks at the tiny width with the given layer count and
    prints each one's time per step and its ratio to the first (uncompiled here: fast)."""
    import subprocess
    import sys

    stacks = "peft,tinytune+plain0+nocompile,tinytune+plain0+nocompile+pertensor"
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_overhead.py"), "--layers", "3", "--rounds", "1",
                           "--steps", "1", "--seq", "32", "--stacks", stacks], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "3 layers at width 64, 32 tokens" in lines[0]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(stacks.split(","))
    assert all(" ms " in row for row in rows.values())
    assert "the peft's time" in rows["tinytune+plain0+nocompile+pertensor"]


def test_bench_attention_compares_transformers_masks_with_tinytunes_attention():
    """The attention benchmark runs both ways on a small packed row and reports tinytune's kept bytes
    equal to the estimate's and below the mask's, and the same loss and gradients."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(TOOLS / "bench_attention.py"), "--tokens", "96", "--examples", "3",
                           "--repeats", "1"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:4]}
    assert set(rows) == {"transformers", "tinytune"}
    assert rows["tinytune"][3] == rows["tinytune"][4]  # kept KiB per token and layer: measured, estimated
    assert float(rows["tinytune"][3]) < float(rows["transformers"][3])
    difference = re.search(r"\(difference (\S+)\); largest gradient difference (\S+)", proc.stdout)
    assert float(difference[1]) < 1e-5 and float(difference[2]) < 1e-4


def _tool(name: str):
    """A script of tools/ imported as a module."""
    import importlib.util
    import sys

    sys.path.insert(0, str(TOOLS))  # the tools import benchkit beside them
    try:
        spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TOOLS))
    return module


def test_bench_vs_peft_takes_medians_over_rounds_and_ratios_within_each(capsys):
    """tokens/s is the median over the runs that completed; a ratio compares runs of the same round
    only, and its range over the rounds is printed with it."""
    bench = _tool("bench_vs_peft")
    spec = {"stack": "tinytune", "label": "tinytune", "model": "m", "smoke": False}
    row = bench.merge_rounds(spec, [{**spec, "tokens_per_s": 100.0, "peak_gib": 4.0, "oom": False},
                                    {**spec, "tokens_per_s": 120.0, "peak_gib": 4.0, "oom": False},
                                    {**spec, "oom": True}])
    assert row["tokens_per_s"] == 110.0 and row["tokens_per_s_range"] == [100.0, 120.0]
    assert row["rounds"] == [100.0, 120.0, None] and row["oom"] is False
    base = bench.merge_rounds({**spec, "stack": "peft", "label": "peft"},
                              [{"label": "peft", "tokens_per_s": v, "peak_gib": 8.0, "oom": False} for v in (50.0, 40.0, 60.0)])
    assert bench.speed_ratio(row, base) == (2.5, 2.0, 3.0)  # 100/50 and 120/40; round 3 ran out of memory
    bench.print_table("m", 2048, 12.0, [base, row], smoke=False)
    out = capsys.readouterr().out
    assert "(100–120)" in out and "tinytune/peft: peak 0.50×, speed 2.50× (rounds 2.00–3.00×)" in out
    failed = bench.merge_rounds(spec, [{**spec, "oom": True}, {**spec, "crash": "killed"}])
    assert failed["oom"] is True and "tokens_per_s" not in failed and bench.speed_ratio(failed, base) is None


def test_peak_breakdown_replays_allocated_as_the_allocator_counts_it():
    """A block freed while another stream still uses it stops counting at ``free_requested`` (as
    ``max_memory_allocated`` does) but is reported as held back until ``free_completed``."""
    tool = _tool("peak_breakdown")
    trace = [{"action": "alloc", "addr": 1, "size": 100}, {"action": "alloc", "addr": 2, "size": 50},
             {"action": "free_requested", "addr": 1, "size": 100},
             {"action": "alloc", "addr": 3, "size": 80},  # 130 allocated; block 1 held back
             {"action": "free_completed", "addr": 1, "size": 100},
             {"action": "free_requested", "addr": 2, "size": 50}, {"action": "free_completed", "addr": 2, "size": 50},
             {"action": "alloc", "addr": 4, "size": 120},  # 200 allocated: the peak
             {"action": "free_requested", "addr": 4, "size": 120}, {"action": "free_completed", "addr": 4, "size": 120}]
    peak, live, held = tool.live_at_peak(trace)
    assert peak == 200 and sorted(b["addr"] for b in live) == [3, 4] and held == []
    peak, live, held = tool.live_at_peak(trace[:4])
    assert peak == 150 and sorted(b["addr"] for b in live) == [1, 2] and held == []
    # stop right after the third allocation: the highest total so far is 150 (blocks 1 and 2)
    _, live, held = tool.live_at_peak(trace[:4] + [{"action": "alloc", "addr": 5, "size": 30}])
    assert sorted(b["addr"] for b in live) == [2, 3, 5] and [b["addr"] for b in held] == [1]


def test_peak_breakdown_smoke_runs_on_cpu():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(TOOLS / "peak_breakdown.py"), "--smoke", "--offload", "--tiles", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "the step runs" in proc.stdout


@pytest.mark.parametrize("per_example", [True, False], ids=["per-example", "transformers-mask"])
def test_packed_examples_never_attend_to_each_other(tiny_model_dir, per_example):
    """Each example's logits inside a packed row equal its logits alone, and the packed loss is the
    sum of the examples' losses: as a run that packs attends (SDPA per example), and with the mask
    transformers builds from the position ids."""
    from tinytune import attention, data
    from tinytune.loss import causal_lm_loss_sum

    torch.manual_seed(0)
    model = loading.load_model(loading.resolve_source(str(tiny_model_dir)), 16, torch.device("cpu")).eval()
    if per_example:
        assert attention.install(model, packed=True) == attention.SDPA
    gen = torch.Generator().manual_seed(1)
    examples = [data.Example(ids, ids) for ids in (torch.randint(3, 2000, (n,), generator=gen).tolist() for n in (9, 14, 5, 11))]
    (row,) = data.pack(examples, seq_len=64, seed=0)
    batch = data.collate([row], pad_id=2)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        total = 0.0
        for a, b in zip(starts, starts[1:]):
            ids = torch.tensor([row.input_ids[a:b]])
            alone = model(input_ids=ids).logits[0]
            torch.testing.assert_close(packed[a:b], alone, rtol=1e-4, atol=1e-4)
            loss, _ = causal_lm_loss_sum(model.get_output_embeddings(), model.get_decoder()(input_ids=ids).last_hidden_state, ids)
            total += float(loss)
        loss_packed, n = train.forward_loss(model, batch, torch.device("cpu"), torch.float32)
    assert n == sum(len(e.input_ids) - 1 for e in examples)
    assert float(loss_packed) == pytest.approx(total, rel=1e-5)


def test_a_packed_run(tiny_model_dir, demo_file, tmp_path, capsys):
    from tinytune.cli import main

    out = tmp_path / "run"
    assert main(["--model", str(tiny_model_dir), "--data", str(demo_file), "--out", str(out), "--max-steps", "2",
                 "--rank", "4", "--seq-len", "256", "--batch", "2", "--grad-accum", "1", "--no-sample", "--pack"]) == 0
    said = capsys.readouterr().out
    assert "packed 46 train examples into" in said and "rows of ≤256 tokens" in said


def tensors_on_autograd_contexts(model, ids) -> int:
    """Tensors that custom autograd functions keep as attributes of their context (invisible to
    saved-tensor hooks, so out of checkpointing's reach), between forward and backward. The loss's
    own node is left out: it keeps the gradient of its input by design (tinytune.loss)."""
    loss_sum, n = train.forward_loss(model, {"input_ids": ids, "labels": ids},
                                     torch.device("cpu"), torch.float32)
    seen, todo, kept = set(), [loss_sum.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for value in () if type(node).__name__ == "_LossWithGradientBackward" else getattr(node, "__dict__", {}).values():
            values = value if isinstance(value, (tuple, list)) else (value,)
            kept += sum(torch.is_tensor(v) for v in values)
        todo.extend(next_node for next_node, _ in node.next_functions)
    (loss_sum / n).backward()
    return kept


FREED_BLOCKS = """
import sys, psutil, torch
from tinytune import memsave
if sys.argv[1] == "returned":
    assert memsave.return_freed_host_memory()
rss = lambda: psutil.Process().memory_info().rss
big = torch.ones(24 * 2**20, dtype=torch.uint8)
del big  # a large block freed: glibc raises its mmap threshold past 8 MiB
before = rss()
pairs = [(torch.ones(2**21), torch.ones(2**14)) for _ in range(64)]  # 8 MiB blocks, each with a small one after it
kept = [small for _, small in pairs]
del pairs  # the blocks are freed; the small tensors keep the heap from shrinking past them
print((rss() - before) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_cpu_run_gives_freed_tensors_back_to_the_system():
    """Freed 8 MiB blocks stay with the process under glibc's default (its threshold raised by a
    larger block freed before, and small tensors after them that keep the heap from shrinking); with
    ``return_freed_host_memory`` they go back to the system."""
    import subprocess

    def grown(mode: str) -> float:
        proc = subprocess.run([sys.executable, "-c", FREED_BLOCKS, mode], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return float(proc.stdout)

    assert grown("default") > 256  # MiB of the 512 freed
    assert grown("returned") < 32


def test_checkpointing_enabled_again_hooks_the_embeddings_once(tiny_model_dir):
    """Reentrant checkpointing needs the embeddings' output to require grad; enabling it again (the
    calibration's step, then the run's; offloading) leaves one hook doing that, not one per call."""
    model = loading.load_model(loading.resolve_source(str(tiny_model_dir)), 16, torch.device("cpu"))
    for setup in (memsave.enable_checkpointing, memsave.enable_checkpointing, memsave.offload_checkpoints):
        setup(model)
    embeddings = model.get_input_embeddings()
    assert len(embeddings._forward_hooks) == 1
    assert embeddings(IDS).requires_grad


def test_frozen_int8_layers_keep_no_input_copies_on_autograd_contexts(tiny_model_dir):
    """bitsandbytes' int8 matmul keeps its (flattened) input on its autograd context, out of reach of
    saved-tensor hooks (non-reentrant checkpointing's, offloading's); the frozen int8 path keeps none,
    and gives bitsandbytes' gradients. Layers run plain: reentrant checkpointing's first forward
    builds no autograd graph to look at."""
    from tinytune import quant

    grads = {}
    for name in ("bitsandbytes", "frozen int8"):
        torch.manual_seed(0)
        model = loading.load_model(loading.resolve_source(str(tiny_model_dir)), 8, torch.device("cpu"))
        if name == "bitsandbytes":  # undo the frozen path: bitsandbytes' own forward
            for m in model.modules():
                if quant.quantized_bits(m) == 8:
                    del m.forward
        adapters.apply(model, TrainConfig(rank=4, alpha=8, dropout=0.0, bits=8))
        _nonzero_adapters(model)
        model.enable_input_require_grads()  # as checkpointing does: the first layer's input too
        model.train()
        alive = tensors_on_autograd_contexts(model, IDS)
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        n_int8 = sum(quant.quantized_bits(m) == 8 for m in model.modules())
        assert alive == (n_int8 if name == "bitsandbytes" else 0), (name, alive, n_int8)
    for key, g in grads["bitsandbytes"].items():  # bitsandbytes computes this gradient in fp16
        torch.testing.assert_close(grads["frozen int8"][key], g, rtol=2e-2, atol=2e-5, msg=key)


def test_host_embedding_gives_the_same_losses_and_gradients(tiny_model_dir):
    """The table moves out of the parameters; lookups, logits and adapter gradients stay the same.
    (On CUDA the rows travel to the GPU; tests/test_gpu.py runs that.)"""
    plain = lora_grads(tiny_model_dir, 16, lambda m: None)

    def host(model):
        emb = model.get_input_embeddings()
        model.set_input_embeddings(memsave.HostEmbedding(emb, torch.device("cpu")))
        assert not any(p is emb.weight for p in model.parameters())

    moved = lora_grads(tiny_model_dir, 16, host)
    for key in plain:
        torch.testing.assert_close(moved[key], plain[key], rtol=1e-6, atol=0, msg=key)


def test_host_embeddings_apply_only_to_untied_frozen_tables_on_cuda():
    from tinytune.memory.estimate import Setup, estimate
    from tinytune.presets import model_shape

    assert memsave.host_embeddings_apply(tied=False, technique="lora", device_type="cuda")
    assert not memsave.host_embeddings_apply(tied=True, technique="lora", device_type="cuda")
    assert not memsave.host_embeddings_apply(tied=False, technique="full", device_type="cuda")
    assert not memsave.host_embeddings_apply(tied=False, technique="lora", device_type="cpu")
    shape = model_shape("llama-3.1-8b")
    on_gpu = estimate(shape, Setup(device="cuda")).components["embeddings, norms, head"]
    full = estimate(shape, Setup(device="cuda", technique="full", bits=16)).components["embeddings, norms, head"]
    assert full - on_gpu == shape.vocab * shape.hidden * 2  # the 1 GiB bf16 input table
