import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from tinytune import adapters, loading, rundir, train
from tinytune.config import TrainConfig
from tinytune.export import export

from test_train import tiny_cfg


@pytest.fixture(scope="module")
def trained_runs(tiny_model_dir, tmp_path_factory):
    from conftest import write_jsonl
    from make_demo_data import make

    tmp = tmp_path_factory.mktemp("runs")
    data = write_jsonl(tmp / "d.jsonl", make(32, seed=3))
    runs = {}
    for bits in (4, 16):
        runs[bits] = train.run(tiny_cfg(tiny_model_dir, data, tmp / f"run{bits}", bits=bits, max_steps=4, eval_fraction=0.0,
                                        dropout=0.0), stream=open("/dev/null", "w"))
    return runs


def adapter_model(run_dir, adapter=None):
    cfg = TrainConfig.load(run_dir / "config.json")
    model = loading.load_model(loading.resolve_source(cfg.model), cfg.bits, torch.device("cpu"))
    adapters.apply(model, cfg, total_steps=cfg.max_steps or 0)
    adapters.load_state(model, rundir.load_tensors(adapter or run_dir / "adapter.safetensors"))
    return model.eval()


IDS = torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [4, 16])
def test_merged_fp32_export_matches_the_adapter_model(trained_runs, tmp_path, bits):
    run_dir = trained_runs[bits]
    out = export(run_dir, tmp_path / "merged", dtype="fp32", say=lambda _s: None)
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        want = adapter_model(run_dir)(input_ids=IDS).logits
        got = merged(input_ids=IDS).logits
    # Same math in another order (x·W + s·x·Aᵀ·Bᵀ vs x·(W + s·B·A)): fp32 rounding only.
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fp16_export_is_a_plain_sharded_hf_model_that_generates(trained_runs, tmp_path):
    run_dir = trained_runs[4]
    out = export(run_dir, tmp_path / "merged16", dtype="fp16", max_shard_size="2MB", say=lambda _s: None)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer.json"} <= names
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # A fresh interpreter with no tinytune import loads and generates.
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}); t = AutoTokenizer.from_pretrained({str(out)!r});"
        "assert m.dtype == torch.float16, m.dtype;"
        "ids = t('Hello', return_tensors='pt');"
        "o = m.float().generate(**ids, max_new_tokens=5, do_sample=False);"
        "assert o.shape[1] == ids['input_ids'].shape[1] + 5; print('ok', 'tinytune' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "ok False", result.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = adapter_model(run_dir)(input_ids=IDS).logits
        got = merged(input_ids=IDS).logits
    # fp16 storage rounds each weight by ≤ 2^-11 relative; on this model that moves logits ≤ 1e-2.
    assert (got - want).abs().max() < 1e-2


def test_peft_loads_the_adapter_and_agrees(trained_runs):
    peft = pytest.importorskip("peft")
    run_dir = trained_runs[16]
    cfg = TrainConfig.load(run_dir / "config.json")
    base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, run_dir / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=IDS).logits, adapter_model(run_dir)(input_ids=IDS).logits,
                                   rtol=1e-5, atol=1e-5)


def test_export_takes_the_runs_newest_weights_or_the_checkpoint_asked_for(tiny_model_dir, tmp_path):
    """A run killed before its end (or stopped, resumed and killed) has checkpoints newer than its final
    adapter, or no final adapter: export takes the newest and says so; --checkpoint picks one."""
    from conftest import write_jsonl
    from make_demo_data import make
    from tinytune.errors import UserError

    run = tmp_path / "run"
    train.run(tiny_cfg(tiny_model_dir, write_jsonl(tmp_path / "d.jsonl", make(16, seed=3)), run, bits=16, max_steps=4,
                       eval_fraction=0.0, dropout=0.0, save_every="1", keep_checkpoints=3), stream=open("/dev/null", "w"))
    ckpt = {step: run / "checkpoints" / f"step-{step:08d}" / "adapter.safetensors" for step in (2, 3, 4)}
    assert all(p.is_file() for p in ckpt.values())

    def exported_logits(out, **kw):
        said = []
        export(run, out, dtype="fp32", say=said.append, **kw)
        with torch.no_grad():
            return AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=IDS).logits, said

    def logits_of(adapter):
        with torch.no_grad():
            return adapter_model(run, adapter)(input_ids=IDS).logits

    got, said = exported_logits(tmp_path / "final")  # a finished run: its final adapter
    torch.testing.assert_close(got, logits_of(run / "adapter.safetensors"), rtol=1e-4, atol=1e-4)
    assert len(said) == 1
    got, _ = exported_logits(tmp_path / "at2", step=2)
    torch.testing.assert_close(got, logits_of(ckpt[2]), rtol=1e-4, atol=1e-4)
    assert (got - logits_of(ckpt[4])).abs().max() > 1e-3  # step 2 is not the end

    shutil.copy(ckpt[2], run / "adapter.safetensors")  # stopped at step 2, resumed, killed after step 4
    got, said = exported_logits(tmp_path / "stale")
    assert said[0] == f"{run} has a newer checkpoint than its final adapter: exporting the checkpoint of step 4"
    torch.testing.assert_close(got, logits_of(ckpt[4]), rtol=1e-4, atol=1e-4)
    (run / "adapter.safetensors").unlink()  # killed before its end
    _, said = exported_logits(tmp_path / "killed")
    assert said[0] == f"{run} has no final adapter: exporting the checkpoint of step 4"

    with pytest.raises(UserError, match=r"^--checkpoint 1: .* has no checkpoint of step 1 \(it keeps: 2, 3, 4\)$"):
        export(run, tmp_path / "nope", step=1, say=lambda _s: None)
    assert not (tmp_path / "nope").exists()


def test_export_refuses_bad_inputs_and_leaves_nothing(trained_runs, tmp_path):
    from tinytune.errors import UserError

    with pytest.raises(UserError, match="not a tinytune run directory"):
        export(tmp_path, tmp_path / "x", say=lambda _s: None)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds files"):
        export(trained_runs[16], occupied, say=lambda _s: None)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]
    with pytest.raises(UserError, match="--dtype"):
        export(trained_runs[16], tmp_path / "y", dtype="int4", say=lambda _s: None)
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.tmp-*"))


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_export_to_a_full_or_unwritable_disk_is_one_line_and_leaves_nothing(error, trained_runs, tmp_path, monkeypatch, capsys):
    """The disk fills up half-way through the shards: no partial model directory stays behind."""
    from transformers import PreTrainedModel

    from tinytune.cli import main

    real = PreTrainedModel.save_pretrained

    def fails_half_way(self, save_directory, **kw):
        real(self, save_directory, **kw)  # the shards are written …
        raise OSError(error, os.strerror(error))  # … and then the disk is full

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", fails_half_way)
    out = tmp_path / "new" / "merged"
    assert main(["export", str(trained_runs[16]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tinytune: error: --out {out}: cannot write the export ({os.strerror(error)}); free space or choose another directory"
    assert list(tmp_path.iterdir()) == []


def test_shard_sizes_read_as_transformers_reads_them_and_in_binary_units():
    from tinytune.errors import UserError
    from tinytune.export import shard_size_bytes

    assert shard_size_bytes("200MB") == 200 * 10**6 and shard_size_bytes(" 1.5 gb ") == 1_500_000_000
    assert shard_size_bytes("2GiB") == 2 * 2**30 and shard_size_bytes(".5KB") == 500
    for bad in ("huge", "0MB", "100", "5 GiBs", "-5MB"):
        with pytest.raises(UserError, match="is not a size"):
            shard_size_bytes(bad)
