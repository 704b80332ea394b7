"""Never lose a run: atomic checkpoints, exact resume after SIGKILL, SIGTERM, OOM recovery, NaN steps."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tinytune import checkpoint, loading, optim, train
from tinytune.cli import main
from tinytune.config import SaveEvery, TrainConfig, parse_save_every
from tinytune.errors import UserError
from tinytune.export import saved_step

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}


def train_argv(model_dir, data_file, out, steps=12, *extra):
    return ["--model", str(model_dir), "--data", str(data_file), "--out", str(out), "--max-steps", str(steps),
            "--rank", "4", "--bits", "4", "--seq-len", "128", "--batch", "2", "--grad-accum", "2", "--no-sample",
            "--save-every", "1", *extra]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def assert_same_tensors(a: Path, b: Path, atol: float = 0.0) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        if atol == 0.0:
            assert torch.equal(ta[k], tb[k]), k
        else:
            torch.testing.assert_close(ta[k], tb[k], atol=atol, rtol=0)


# --- the --save-every parser --------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("100", SaveEvery(steps=100)), ("1step", SaveEvery(steps=1)), ("25 steps", SaveEvery(steps=25)),
    ("30s", SaveEvery(seconds=30)), ("10m", SaveEvery(seconds=600)), ("1.5h", SaveEvery(seconds=5400)),
    ("off", SaveEvery()), ("0", SaveEvery()),
])
def test_parse_save_every(text, expected):
    assert parse_save_every(text) == expected


@pytest.mark.parametrize("text", ["soon", "-5", "1.5", "10x", "", "0s", "5 minutes"])
def test_parse_save_every_rejects(text):
    with pytest.raises(UserError, match="--save-every"):
        parse_save_every(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=12))
def test_parse_save_every_never_crashes(text):
    try:
        every = parse_save_every(text)
    except UserError as e:
        assert "--save-every" in str(e)
    else:
        assert every.steps >= 0 and every.seconds >= 0


# --- optimizer state round trip without pickle --------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda p: bnb.optim.PagedAdamW8bit(p, lr=1e-2), lambda p: bnb.optim.PagedAdamW32bit(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95)),
    lambda p: optim.make_optimizer("paged-adamw-8bit", [{"params": p}], 1e-2, 0.0),
], ids=["paged-adamw-8bit", "paged-adamw-32bit", "adamw", "flat-paged-adamw-8bit"])
def test_optimizer_state_survives_json_and_safetensors(make, tmp_path):
    """A restored optimizer takes exactly the same next steps as the original (8-bit blocks included)."""
    torch.manual_seed(0)
    shapes = [(128, 64), (64,), (4, 4096)]

    def fresh():
        torch.manual_seed(1)
        ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        return ps, make(ps)

    def step(ps, opt, k):
        g = torch.Generator().manual_seed(k)
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad()

    ps, opt = fresh()
    for k in range(3):
        step(ps, opt, k)
    tensors: dict = {}
    skeleton = json.loads(json.dumps(checkpoint._split(opt.state_dict(), tensors, {}, "optimizer")))
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "t.safetensors"))
    ps2, opt2 = fresh()
    with torch.no_grad():
        for a, b in zip(ps2, ps):
            a.copy_(b)
    opt2.load_state_dict(checkpoint._join(skeleton, load_file(str(tmp_path / "t.safetensors"))))
    for k in range(3, 6):
        step(ps, opt, k)
        step(ps2, opt2, k)
    for a, b in zip(ps, ps2):
        assert torch.equal(a, b)


def test_resuming_checkpoints_of_another_format_stops_in_one_line(tiny_model_dir, demo_file, tmp_path, capsys):
    """Format 1 held one optimizer state per tensor; this version's optimizer works on flat groups.
    Such checkpoints are not damaged, so resuming names their format instead of skipping them all
    and reporting that the run has no checkpoint."""
    run_dir = tmp_path / "run"
    assert main(train_argv(tiny_model_dir, demo_file, run_dir, 3, "--keep-checkpoints", "3")) == 0
    for path in checkpoint.complete(run_dir):
        state = json.loads((path / "state.json").read_text())
        (path / "state.json").write_text(json.dumps({**state, "format": 1}))
    capsys.readouterr()
    assert main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint format 1, this tinytune reads format 2; resume it with the tinytune " \
        "version that wrote it" in err[0] and "damaged" not in err[0]


# --- kill, stop and resume ----------------------------------------------------------------------------

def test_sigkill_at_a_random_step_then_resume_gives_bit_identical_weights(tiny_model_dir, demo_file, tmp_path):
    """Kill a real training process with SIGKILL mid-run (checkpoints every step, so the kill may land
    inside a checkpoint write), resume it, and compare with a run that was never interrupted."""
    steps = 16
    kill_after = random.randint(3, 11)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run([sys.executable, "-m", "tinytune", *train_argv(tiny_model_dir, demo_file, reference, steps)],
                   check=True, capture_output=True, env=ENV, timeout=300)

    proc = subprocess.Popen([sys.executable, "-m", "tinytune", *train_argv(tiny_model_dir, demo_file, killed, steps)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        done = [r for r in _safe_metrics(killed) if "loss" in r]
        if done and done[-1]["step"] >= kill_after:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill at step {kill_after}"
    stopped_at = checkpoint.complete(killed)[0].name
    # the run's adapter (and PEFT copy) is the newest checkpoint's, or the one before if the kill fell
    # between writing the two
    saved, newest = saved_step(killed / "adapter.safetensors"), checkpoint.step_of(checkpoint.complete(killed)[0])
    assert saved in (newest, newest - 1) and (killed / "peft").is_dir()
    assert_same_tensors(killed / "checkpoints" / f"step-{saved:08d}" / "adapter.safetensors",
                        killed / "adapter.safetensors")

    result = subprocess.run([sys.executable, "-m", "tinytune", "--resume", str(killed)], capture_output=True,
                            text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"from {stopped_at}" in result.stdout, (kill_after, result.stdout)
    assert_same_tensors(reference / "adapter.safetensors", killed / "adapter.safetensors")
    assert step_losses(killed) == step_losses(reference)  # every step once, same loss
    assert [r["step"] for r in metrics(killed) if "loss" in r] == list(range(1, steps + 1))
    assert not any(p.name.endswith(".tmp") for p in (killed / "checkpoints").iterdir())


def _safe_metrics(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, demo_file, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tinytune", *train_argv(tiny_model_dir, demo_file, run_dir, 400, "--save-every", "off")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any("loss" in r and r["step"] >= 2 for r in _safe_metrics(run_dir)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopped at step" in out and f"tinytune --resume {run_dir}" in out
    (ckpt,) = checkpoint.complete(run_dir)
    step = int(ckpt.name.split("-")[1])
    assert 2 <= step < 400
    assert load_file(str(run_dir / "adapter.safetensors")).keys() == load_file(str(ckpt / "adapter.safetensors")).keys()
    assert [r["step"] for r in metrics(run_dir) if "loss" in r][-1] == step


# --- out of memory and non-finite losses, injected ----------------------------------------------------

def _cfg(model_dir, data_file, out, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), data=str(data_file), out=str(out), rank=4, alpha=8, bits=4, seq_len=128,
                micro_batch=4, grad_accum=2, max_steps=6, dropout=0.0, sample=False, save_every="off", eval_every=100)
    base.update(kw)
    return TrainConfig(**base)


class Recorder:
    """Which examples each optimizer step trained on (rows without padding), from forward calls."""

    def __init__(self, fail=None):
        self.steps: list[list[tuple]] = []
        self.current: list[tuple] = []
        self.calls = 0
        self.fail = fail

    def forward(self, real):
        def wrapped(model, batch, device, dtype):
            self.calls += 1
            if self.fail is not None:
                injected = self.fail(self, batch)
                if injected is not None:
                    return injected
            for ids, labels in zip(batch["input_ids"], batch["labels"]):  # up to its last trained token: no padding
                self.current.append(tuple(ids[: int((labels != -100).nonzero().max()) + 1].tolist()))
            return real(model, batch, device, dtype)
        return wrapped

    def listen(self, record):
        if record.get("event") == "oom":
            self.current = []  # the failed attempt's micro-batches are trained again
        elif "loss" in record:
            self.steps.append(sorted(self.current))
            self.current = []


def test_oom_halves_the_micro_batch_and_trains_the_same_examples(tiny_model_dir, demo_file, tmp_path, monkeypatch):
    real = train.forward_loss
    reference = Recorder()
    monkeypatch.setattr(train, "forward_loss", reference.forward(real))
    train.run(_cfg(tiny_model_dir, demo_file, tmp_path / "reference"), listener=reference.listen, stream=open(os.devnull, "w"))

    def fail(rec, batch):  # the "GPU" holds at most 2 sequences from step 2 on, then at most 1 from step 4 on
        limit = 1 if len(rec.steps) >= 3 else 2 if len(rec.steps) >= 1 else 8
        if batch["input_ids"].shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return None

    injected = Recorder(fail)
    monkeypatch.setattr(train, "forward_loss", injected.forward(real))
    out = train.run(_cfg(tiny_model_dir, demo_file, tmp_path / "oom"), listener=injected.listen, stream=open(os.devnull, "w"))

    events = [r for r in metrics(out) if r.get("event") == "oom"]
    assert [(e["step"], e["split"]) for e in events] == [(2, 2), (4, 4)]
    assert injected.steps == reference.steps  # no example skipped or seen twice, same step order
    ref_losses, oom_losses = step_losses(tmp_path / "reference"), step_losses(out)
    assert ref_losses.keys() == oom_losses.keys() == set(range(1, 7))
    for step in ref_losses:
        assert math.isclose(ref_losses[step], oom_losses[step], rel_tol=1e-5)
    assert_same_tensors(tmp_path / "reference" / "adapter.safetensors", out / "adapter.safetensors", atol=1e-5)


def test_oom_first_checkpoints_the_plain_layers_and_trains_the_same(tiny_model_dir, demo_file, tmp_path, monkeypatch):
    """Plain last layers are the first memory given back after an out-of-memory error: same losses,
    every layer checkpointed from then on, the micro-batch untouched."""
    train.run(_cfg(tiny_model_dir, demo_file, tmp_path / "reference", plain_layers=1, max_steps=3),
              stream=open(os.devnull, "w"))
    real, seen = train.forward_loss, {"failed": False, "flags": []}

    def once(model, batch, device, dtype):
        layers = list(loading.decoder_layers(model))
        if torch.is_grad_enabled():
            seen["flags"].append([layer.gradient_checkpointing for layer in layers])
        if torch.is_grad_enabled() and len(seen["flags"]) == 3 and not seen["failed"]:  # step 2's first micro-batch
            seen["failed"] = True
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, batch, device, dtype)

    monkeypatch.setattr(train, "forward_loss", once)
    out = train.run(_cfg(tiny_model_dir, demo_file, tmp_path / "oom", plain_layers=1, max_steps=3), stream=open(os.devnull, "w"))
    (event,) = [r for r in metrics(out) if r.get("event") == "oom"]
    assert (event["step"], event["action"], event["plain_layers"], event["split"]) == (2, "every layer checkpointed", 0, 1)
    assert seen["flags"][0][-1] is False and all(seen["flags"][0][:-1])  # the last layer plain at first
    assert all(all(flags) for flags in seen["flags"][3:])  # every layer checkpointed after the error
    ref_losses, oom_losses = step_losses(tmp_path / "reference"), step_losses(out)
    assert ref_losses.keys() == oom_losses.keys() == {1, 2, 3}
    for step in ref_losses:
        assert math.isclose(ref_losses[step], oom_losses[step], rel_tol=1e-5)


def test_oom_at_one_example_with_checkpointing_stops_with_one_line(tiny_model_dir, demo_file, tmp_path, monkeypatch, capsys):
    def always(model, batch, device, dtype):
        if torch.is_grad_enabled():  # training runs out of memory; evaluation (no gradients) fits
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(model, batch, device, dtype)

    real = train.forward_loss

    monkeypatch.setattr(train, "forward_loss", always)
    out = tmp_path / "run"
    code = main(train_argv(tiny_model_dir, demo_file, out, 4))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("tinytune: error: out of memory at step 1 even at micro-batch 1"), err
    assert [e["split"] for e in metrics(out) if e.get("event") == "oom"] == [2]  # micro-batch 2 → 1, then give up


def test_nonfinite_loss_skips_the_step_and_training_goes_on(tiny_model_dir, demo_file, tmp_path, monkeypatch):
    def fail(rec, batch):
        if len(rec.steps) == 2:  # every micro-batch of step 3
            return torch.tensor(float("nan"), requires_grad=True), 1
        return None

    rec = Recorder(fail)
    monkeypatch.setattr(train, "forward_loss", rec.forward(train.forward_loss))
    out = train.run(_cfg(tiny_model_dir, demo_file, tmp_path / "run"), listener=rec.listen, stream=open(os.devnull, "w"))
    records = metrics(out)
    assert [r["step"] for r in records if r.get("event") == "nonfinite"] == [3]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert steps[3]["loss"] is None and all(steps[s]["loss"] is not None for s in (1, 2, 4, 5, 6))
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter.safetensors")).values())


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, demo_file, tmp_path, monkeypatch, capsys):
    real = train.forward_loss
    calls = {"n": 0}

    def nan_from_step_4(model, batch, device, dtype):
        calls["n"] += torch.is_grad_enabled()  # count training micro-batches, not evaluation
        if calls["n"] > 3 * 2:  # grad_accum 2: steps 1–3 are fine
            return torch.tensor(float("inf"), requires_grad=True), 1
        return real(model, batch, device, dtype)

    monkeypatch.setattr(train, "forward_loss", nan_from_step_4)
    out = tmp_path / "run"
    code = main(train_argv(tiny_model_dir, demo_file, out, 20))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("tinytune: error: training diverged: the loss was NaN/inf for 5 steps in a row (steps 4–8)")
    assert "step-00000003" in err[-1]
    assert [p.name for p in checkpoint.complete(out)][0] == "step-00000003"
    # the run's adapter is the last good checkpoint's, not the diverged weights
    assert saved_step(out / "adapter.safetensors") == 3
    assert_same_tensors(out / "checkpoints" / "step-00000003" / "adapter.safetensors", out / "adapter.safetensors")


# --- damaged or unwritable checkpoints ---------------------------------------------------------------

def test_resume_skips_a_damaged_newest_checkpoint_and_unpickles_nothing(tiny_model_dir, demo_file, tmp_path, capsys, monkeypatch):
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert main(train_argv(tiny_model_dir, demo_file, reference, 6, "--keep-checkpoints", "3")) == 0
    assert main(train_argv(tiny_model_dir, demo_file, run_dir, 6, "--keep-checkpoints", "3")) == 0
    # pretend the run died after step 5 while its last checkpoint was being damaged on disk
    newest, older = checkpoint.complete(run_dir)[:2]
    import shutil

    shutil.rmtree(newest)
    (run_dir / "adapter.safetensors").unlink()
    damaged = checkpoint.complete(run_dir)[0]
    (damaged / "trainer.safetensors").write_bytes(b"\x00" * 100)
    capsys.readouterr()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("resume must not unpickle anything")

    import pickle

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, no_unpickling)
    assert main(["--resume", str(run_dir)]) == 0
    out = capsys.readouterr()
    assert "skipping a damaged checkpoint" in out.out and damaged.name in out.out
    assert_same_tensors(reference / "adapter.safetensors", run_dir / "adapter.safetensors")


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_checkpoint_write_failure_is_one_line_and_keeps_the_previous(error, tiny_model_dir, demo_file, tmp_path,
                                                                   monkeypatch, capsys):
    from safetensors import torch as st_torch

    real_save = st_torch.save_file
    calls = {"n": 0}

    def failing(tensors, filename, metadata=None):
        if "checkpoints" in str(filename):
            calls["n"] += 1
            if calls["n"] > 4:  # two checkpoints (two files each) succeed, the third fails
                raise OSError(error, os.strerror(error))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", failing)
    out = tmp_path / "run"
    code = main(train_argv(tiny_model_dir, demo_file, out, 10, "--keep-checkpoints", "5"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"tinytune: error: {out / 'checkpoints'}: cannot write checkpoint step 3 ({os.strerror(error)})")
    assert [p.name for p in (out / "checkpoints").iterdir()] and all(not p.name.startswith(".") for p in (out / "checkpoints").iterdir())
    assert [p.name for p in checkpoint.complete(out)] == ["step-00000002", "step-00000001"]
    checkpoint.read(checkpoint.complete(out)[0])  # intact


class _FillingFile:
    """A file on a disk that fills up after ``room`` writes."""

    def __init__(self, file, room: int) -> None:
        self.file, self.room = file, room

    def write(self, text: str) -> int:
        self.room -= 1
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)


@pytest.mark.parametrize("where", ["config", "metrics", "adapter"])
def test_a_disk_that_fills_up_is_one_line_and_says_how_to_go_on(where, tiny_model_dir, demo_file, tmp_path,
                                                                monkeypatch, capsys):
    """Every write into the run directory, not only checkpoints: the config at the start (nothing is
    left behind), a metrics record mid-run (resume from the newest checkpoint), the final adapter
    (export from the checkpoint of the same step)."""
    from tinytune import rundir

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with monkeypatch.context() as m:
        if where == "config":
            real_write = rundir.atomic_write_text

            def atomic_write_text(path, text):
                if path.name == "config.json":
                    raise full
                real_write(path, text)
            m.setattr(rundir, "atomic_write_text", atomic_write_text)
        elif where == "metrics":
            m.setattr(rundir, "open", lambda *a, **k: _FillingFile(open(*a, **k), room=4), raising=False)
        else:
            real_save = rundir.save_tensors

            def save_tensors(path, tensors, metadata=None):
                if path.name == "adapter.safetensors" and metadata["step"] == "4":  # the last one
                    raise full
                real_save(path, tensors, metadata=metadata)
            m.setattr(rundir, "save_tensors", save_tensors)
        out = tmp_path / "run"
        code = main(train_argv(tiny_model_dir, demo_file, out, 4, "--eval-fraction", "0"))
        err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    space = "No space left on device); free space or fix the directory's permissions, then"
    if where == "config":
        assert last == f"tinytune: error: {out / 'config.json'}: cannot write ({space} start the run again"
        assert not out.exists()
    elif where == "metrics":
        assert last == f"tinytune: error: {out / 'metrics.jsonl'}: cannot write ({space} resume with: tinytune --resume {out}"
        assert main(["--resume", str(out)]) == 0  # the disk has room again
        assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3, 4]
    else:
        assert last == (f"tinytune: error: {out / 'adapter.safetensors'}: cannot write ({space} export it with: "
                        f"tinytune export {out} (the checkpoint of step 4 holds the same weights)")
        assert main(["export", str(out)]) == 0
        assert (out / "merged" / "config.json").is_file()
    assert not (out / ".lock").exists()
