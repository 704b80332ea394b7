"""The planner: the documented rule, pinned choices, fitting, bad input; `tinytune plan` and a planned run."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tinytune import planner, presets
from tinytune.cli import main
from tinytune.config import GIB
from tinytune.errors import UserError


def budget(gib: float, device: str = "cuda") -> planner.Budget:
    return planner.Budget(int(gib * GIB), device, f"--vram {gib}GB")


def plan(model: str, gib: float, seq_len: int = 2048, **fixed) -> planner.Plan:
    return planner.make_plan(presets.model_shape(model), budget(gib), seq_len, planner.Fixed(**fixed))


def test_rule_prefers_precision_then_rank_then_throughput():
    small = plan("llama-3.2-1b", 12)
    assert (small.chosen.setup.bits, small.chosen.setup.technique, small.chosen.setup.rank) == (16, "lora", 64)
    big = plan("llama-3.1-8b", 10)
    assert (big.chosen.setup.bits, big.chosen.setup.technique) == (4, "lora")  # 16- and 8-bit do not fit
    assert {(c.setup.bits, c.fits) for c in big.runners_up if c.setup.technique == "lora"} == {(16, False), (8, False)}
    # with the input table in host memory, 8-bit LoRA of an 8B model fits 12 GiB
    assert plan("llama-3.1-8b", 12).chosen.setup.bits == 8
    roomy = plan("llama-3.1-8b", 24)
    assert roomy.chosen.setup.bits == 16
    tiny = plan("smollm2-135m", 12, seq_len=512)
    assert not tiny.chosen.setup.gradient_checkpointing and tiny.chosen.setup.micro_batch == 8


def test_memory_left_over_goes_to_plain_last_layers():
    """Checkpointing costs a second forward per layer: the planner leaves as many last layers plain
    as still fit, each one more would not, and a pinned number is kept."""
    fixed = dict(technique="lora", rank=16, bits=4, micro_batch=1)
    p = plan("llama-3.1-8b", 12, **fixed)
    k = p.chosen.setup.plain_layers
    assert p.chosen.setup.gradient_checkpointing and 0 < k < 32 and p.chosen.fits
    assert "the last" in p.chosen.reason and p.chosen.to_dict()["plain_layers"] == k
    assert not p.chosen.setup.offload
    try:  # pinned: kept, whether it then fits only offloaded or not at all
        one_more = plan("llama-3.1-8b", 12, plain_layers=k + 1, **fixed).chosen
    except UserError as e:
        assert f"--plain-layers {k + 1}" in str(e)
        assert re.search(r"needs [\d.]+ GiB, [\d.]+ GiB over the [\d.]+ GiB a plan may use", str(e))  # never "-0.3 over"
    else:
        assert one_more.setup.plain_layers == k + 1 and one_more.setup.offload
    assert plan("llama-3.1-8b", 12, plain_layers=2, **fixed).chosen.setup.plain_layers == 2
    assert plan("llama-3.1-8b", 14, **fixed).chosen.setup.plain_layers > k
    fewer = plan("llama-3.1-8b", 12, **fixed, seq_len=4096).chosen.setup
    assert fewer.plain_layers < k
    assert plan("llama-3.1-8b", 12, plain_layers=0, **fixed).chosen.setup.plain_layers == 0


def test_lora_fa_when_activations_are_the_bottleneck():
    p = plan("llama-3.2-3b", 7.5, seq_len=12288)
    assert p.chosen.setup.technique == "lora-fa" and p.chosen.fits and not p.chosen.setup.offload
    lora = next(c for c in p.runners_up if c.setup.technique == "lora" and c.setup.bits == 4)
    assert not lora.fits and "over" in lora.reason


@settings(max_examples=60, deadline=None)
@given(model=st.sampled_from(presets.model_names()), gib=st.sampled_from([6, 8, 10, 12, 16, 24, 40, 80]),
       seq=st.sampled_from([256, 512, 1024, 2048, 4096, 8192]))
def test_every_chosen_plan_fits_with_the_margin_and_more_memory_never_plans_worse(model, gib, seq):
    assume(seq <= presets.model_shape(model).max_context)
    try:
        p = plan(model, gib, seq)
    except UserError as e:
        assert "GiB over" in str(e) and "smallest plan" in str(e)
        return
    c = p.chosen
    assert c.est.needed <= gib * GIB * (1 - planner.SAFETY_MARGIN)
    assert sum(b for _, b, _ in c.est.table()) == c.est.needed
    more = plan(model, gib * 2, seq)
    assert more.chosen.setup.bits >= c.setup.bits


def test_pinned_choices_are_kept_and_the_rest_planned():
    p = plan("llama-3.2-1b", 12, rank=8, bits=4, micro_batch=1)
    s = p.chosen.setup
    assert (s.rank, s.bits, s.micro_batch) == (8, 4, 1) and p.chosen.grad_accum == 8
    with pytest.raises(UserError, match=r"with --bits 16 .*GiB over the 11.40 GiB a plan may use; drop a fixed choice"):
        plan("llama-3.1-8b", 12, bits=16)


def test_nothing_fits_names_the_minimum():
    with pytest.raises(UserError, match=r"llama-3.1-70b .* needs [\d.]+ GiB, [\d.]+ GiB over"):
        plan("llama-3.1-70b", 24)


def test_bad_budget_and_context():
    with pytest.raises(UserError, match="less than the CUDA context"):
        plan("llama-3.2-1b", 0.3)
    with pytest.raises(UserError, match="beyond llama-3.2-1b's context of 131072"):
        plan("llama-3.2-1b", 12, seq_len=200_000)


def test_gpu_profiles_and_names():
    assert presets.gpu("RTX 4070").vram_bytes == 12 * GIB
    assert presets.gpu("rtx-3060").key == "rtx3060"
    assert not presets.gpu("t4").bf16
    assert presets.gpu_for_device_name("NVIDIA A100-SXM4-40GB").key == "a100-40gb"
    with pytest.raises(UserError, match="did you mean rtx4070"):
        presets.gpu("rtx4071")
    for key in ("rtx3060", "rtx4060ti", "rtx4070", "rtx3090", "rtx4090", "t4", "a100-40gb", "a100-80gb", "h100-80gb"):
        p = presets.gpu(key)
        assert p.vram_bytes > 0 and p.bandwidth_gbs > 0 and p.bf16_tflops > 0
    assert presets.model_shape("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    # a base model's hub id, with or without its organisation, plans as its instruct model (same shape)
    for hub_id, key in [("meta-llama/Llama-3.2-1B", "llama-3.2-1b"), ("Llama-3.1-8B", "llama-3.1-8b"),
                        ("mistralai/Mistral-7B-v0.3", "mistral-7b"), ("google/gemma-2-2b", "gemma-2-2b"),
                        ("gemma-2-2b-it", "gemma-2-2b"), ("Qwen/Qwen2.5-7B", "qwen2.5-7b")]:
        assert presets.model_shape(hub_id).name == key


def test_calibration_scale_corrects_activations_only():
    from tinytune.memory.estimate import Setup, estimate

    est = estimate(presets.model_shape("llama-3.2-1b"), Setup(seq_len=256))
    exact = planner.dynamic_bytes(est)
    assert planner.calibration_scale(est, exact) == pytest.approx(1.0)
    acts = est.components["activations"] + est.components["backward working set"]
    assert planner.calibration_scale(est, exact + acts // 2) == pytest.approx(1.5, rel=1e-6)
    assert planner.calibration_scale(est, 10 * exact) == 3.0
    scaled = planner.make_plan(presets.model_shape("llama-3.1-8b"), budget(12), 2048, activation_scale=1.5)
    assert scaled.chosen.est.needed <= 12 * GIB * 0.95
    assert scaled.chosen.setup.tokens <= plan("llama-3.1-8b", 12).chosen.setup.tokens


def test_plan_command_is_offline_and_torch_free(tmp_path):
    code = ("import sys; from tinytune.cli import main; rc = main(['plan', '--model', 'llama-3.1-8b', '--vram', '12GB', "
            "'--json']); assert 'torch' not in sys.modules, 'plan imported torch'; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["technique"] == "lora" and d["bits"] == 8 and d["fits"]
    assert set(d["breakdown_gib"]) >= {"base weights", "activations", "optimizer states", "allocator slack + CUDA context"}
    assert d["runners_up"] and all(r["reason"] for r in d["runners_up"])


def test_plan_command_text(capsys):
    assert main(["plan", "--gpu", "rtx3060", "--model", "llama-3.2-3b", "--seq-len", "4096"]) == 0
    text = capsys.readouterr().out
    assert "chosen: 16-bit lora r64" in text and "runner-up" in text and "needed (GiB)" in text
    assert "12.00 GiB (--gpu rtx3060" in text


def test_plan_pack_plans_a_packed_run():
    """``plan --pack`` plans as a run that packs does (``Setup.packed``): the JSON is the planner's
    own plan for packed rows, which differs from the unpacked one where the estimate does."""
    argv = ["plan", "--vram", "12GB", "--model", "llama-3.2-1b", "--seq-len", "4096", "--json"]
    plans = {}
    for pack in (False, True):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert main(argv + (["--pack"] if pack else [])) == 0
        plans[pack] = json.loads(out.getvalue())
        budget = planner.resolve_budget(12 * GIB, None, "cuda", "12GB")
        want = planner.make_plan(presets.model_shape("llama-3.2-1b"), budget, 4096, planner.Fixed(packed=pack))
        assert plans[pack] == json.loads(json.dumps(want.to_dict()))
    assert plans[True] != plans[False]


@pytest.mark.parametrize("argv,message", [
    (["plan", "--gpu", "rtx4071"], "did you mean rtx4070"),
    (["plan", "--vram", "256MB"], "less than the CUDA context"),
    (["plan", "--model", "llama-9b-nope", "--vram", "12GB"], "not a known model preset"),
    (["plan", "--model", "llama-3.2-1b", "--vram", "12GB", "--seq-len", "999999"], "beyond llama-3.2-1b's context"),
    (["plan", "--vram", "12GB", "--gpu", "rtx3060"], "--vram and --gpu both given"),
    (["plan", "--model", "llama-3.1-70b", "--vram", "24GB"], "nothing fits"),
    (["plan", "--model", "llama-3.1-8b", "--vram", "1TB", "--rank", "2048"],
     "--rank 2048 is larger than llama-3.1-8b's lora layers allow; use --rank 1024 or less"),
    (["plan", "--model", "llama-3.1-8b", "--vram", "12GB", "--targets", "q_proj,qkv"],
     "--targets qkv matches no linear layer of the decoder"),
])
def test_plan_bad_input(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("model_type,technique,targets", [
    ("llama", "lora", ("all-linear",)), ("llama", "lora", ("q_proj", "o_proj")), ("llama", "vera", ("all-linear",)),
    ("llama", "vera", ("k_proj", "v_proj")), ("phi3", "lora", ("qkv_proj",)), ("phi3", "vera", ("gate_up_proj", "o_proj")),
])
def test_the_planners_largest_rank_is_the_adapters(model_type, technique, targets):
    """A rank the planner allows is one the adapters accept, and one more is refused by both; Phi-3's
    fused projections by their own names and widths."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tinytune import adapters
    from tinytune.config import TrainConfig
    from tinytune.memory.estimate import ModelShape

    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=48, num_hidden_layers=1, vocab_size=64,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                  bos_token_id=0, eos_token_id=0)
    shape = ModelShape.from_config(config, "tiny")
    limit = planner._max_rank(shape, technique, targets)

    def refusal(build) -> str | None:
        try:
            build()
        except UserError as e:
            return str(e)
        return None

    for rank in (limit, limit + 1):
        refusals = [
            refusal(lambda: adapters.apply(AutoModelForCausalLM.from_config(config).to(torch.float32),
                                           TrainConfig(technique=technique, rank=rank, targets=targets), 10)),
            refusal(lambda: planner.make_plan(shape, planner.Budget(GIB, "cuda", "1 GiB"), 16,
                                              planner.Fixed(technique=technique, rank=rank, targets=targets))),
        ]
        if rank == limit:
            assert refusals == [None, None]
        else:
            assert all(f"--rank {rank} is larger than" in r for r in refusals), refusals


def test_planned_run_records_the_plan(tiny_model_dir, demo_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model", str(tiny_model_dir), "--data", str(demo_file), "--out", str(out), "--vram", "2GB",
                 "--rank", "8", "--max-steps", "2", "--no-sample", "--eval-fraction", "0"]) == 0
    plan_json = json.loads((out / "plan.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert plan_json["rank"] == 8 and config["rank"] == 8 and config["alpha"] == 16  # pinned, alpha follows
    assert plan_json["bits"] == 16 and plan_json["technique"] == "lora"  # a tiny model fits unquantized
    assert plan_json["predicted_peak_gib"] > 0 and "activations" in plan_json["breakdown_gib"]
    longest = plan_json["seq_len"]
    assert 16 < longest <= 2048 and config["seq_len"] == longest  # planned for the longest example
    assert "plan: 16-bit lora r8" in capsys.readouterr().out


def test_pinned_run_that_cannot_fit_fails_before_writing(tiny_model_dir, demo_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model", str(tiny_model_dir), "--data", str(demo_file), "--out", str(out), "--vram", "8MB",
                 "--bits", "16", "--batch", "8"]) == 2
    assert "nothing fits" in capsys.readouterr().err and not out.exists()


def test_bench_planner_smoke_runs_a_grid_row_on_cpu():
    """The accuracy benchmark's code path (build at 4 bits, VeRA, padded batch, checkpointing) works without a GPU."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, str(root / "tools" / "bench_planner.py"), "--smoke", "--only", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = proc.stdout.strip().splitlines()[-1]
    assert "vera" in row and row.endswith("ok"), proc.stdout


def test_long_context_turns_on_offloading_and_mlp_tiles_when_nothing_else_fits():
    shape = presets.model_shape("llama-3.1-8b")
    budget = planner.Budget(12 * GIB, "cuda", "--vram 12GB")
    short = planner.make_plan(shape, budget, 2048)
    assert not short.chosen.setup.offload and short.chosen.setup.mlp_tiles == 1  # not needed: not used
    long = planner.make_plan(shape, budget, 16384)
    s = long.chosen.setup
    assert s.offload and s.gradient_checkpointing and s.mlp_tiles == 8 and long.chosen.fits
    assert "offloaded to host memory" in long.chosen.reason and "MLP in 8 tiles" in long.chosen.reason
    from tinytune.config import TrainConfig

    cfg = TrainConfig(seq_len=16384)
    planner.apply(long, cfg, set())
    assert cfg.offload_checkpoints and cfg.mlp_tiles == 8
    with pytest.raises(UserError, match="nothing fits"):  # pinned off: no offloading behind the user's back
        planner.make_plan(shape, budget, 16384, planner.Fixed(gradient_checkpointing=False))


def test_profiles_lists_gpus_and_models(capsys):
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "rtx4070" in out and "NVIDIA GeForce RTX 4070 12GB" in out and "h100-80gb" in out
    assert "llama-3.1-8b" in out and "8.03B" in out


def test_the_readmes_plan_examples_are_what_tinytune_plan_prints(capsys):
    """Every `$ tinytune plan …` example in README.md shown in full is the command's output now (the
    estimate moves with what it learns; an example that no longer matches is to be printed again)."""
    import shlex

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    examples = re.findall(r"```\n\$ (tinytune plan [^\n]*)\n(.*?)```", readme, re.S)
    shown_in_full = [(command, shown) for command, shown in examples if "..." not in shown]
    assert len(shown_in_full) >= 2
    for command, shown in shown_in_full:
        main(shlex.split(command)[1:])
        printed = capsys.readouterr()
        assert (printed.out + printed.err).strip() == shown.strip(), command
