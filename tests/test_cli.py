"""Bad input from the command line: one line on stderr, exit code 2, nothing written."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from tinytune.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, tokenizer_dir):
    """A tiny run that finished its 2 steps (a checkpoint, an adapter, the PEFT copy)."""
    from make_demo_data import make

    root = tmp_path_factory.mktemp("finished")
    data_file = write_jsonl(root / "demo.jsonl", make(24, seed=3))
    run_dir = root / "run"
    assert main(["--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(run_dir), "--max-steps", "2",
                 "--seq-len", "128", "--rank", "4", "--no-sample", "--batch", "2", "--grad-accum", "1"]) == 0
    return run_dir


def _copy_run(run_dir: Path, to: Path, edit=None) -> Path:
    shutil.copytree(run_dir, to)
    if edit:
        edit(to)
    return to


def _set_format(run: Path, version) -> None:
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "tinytune_run_format": version}))


@pytest.fixture
def bad_inputs(tmp_path, tiny_model_dir, demo_file, finished_run):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    malformed = write_jsonl(tmp_path / "malformed.jsonl", [{"text": "fine"}, '{"text": "oops"', {"text": "x"}])
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    binary = tmp_path / "weights.jsonl"
    binary.write_bytes(bytes(range(256)) * 64)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"prompt": "a", "completion": "b"}])
    wrong_type = write_jsonl(tmp_path / "wrongtype.jsonl", [{"instruction": "a", "output": 42}])
    array = tmp_path / "array.json"
    array.write_text('[\n  {"instruction": "a", "output": "b"}\n  {"instruction": "c", "output": "d"}\n]\n')
    huge = tmp_path / "huge.jsonl"
    with open(huge, "w") as f:
        f.write('{"text": "' + "a" * (100 * 2**20) + '"}\n')
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "config.json").write_text("{}")
    corrupt_weights = _copy_run(tiny_model_dir, tmp_path / "corrupt-weights",
                                lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 4096))
    corrupt_gguf = tmp_path / "corrupt.gguf"
    corrupt_gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(2000))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("this is a text file")
    runs = tmp_path / "runs-in"
    corrupt_adapter = _copy_run(finished_run, runs / "corrupt-adapter",
                                lambda d: (d / "adapter.safetensors").write_bytes(b'{"not": "safetensors"}'))
    future = _copy_run(finished_run, runs / "future", lambda d: _set_format(d, 99))
    no_ckpt = _copy_run(finished_run, runs / "no-checkpoint", lambda d: shutil.rmtree(d / "checkpoints"))
    m, d = str(tiny_model_dir), str(demo_file)
    return {
        "missing model": (["--model", str(tmp_path / "nope")], "no such directory"),
        "non-causal model": (["--model", str(bert)], "not a causal language model"),
        "unsupported architecture": (["--model", str(gpt2)], "architecture 'gpt2' is not supported"),
        "corrupt safetensors weights": (["--model", str(corrupt_weights), "--data", d], "cannot load the model weights"),
        "corrupt gguf": (["--model", str(corrupt_gguf)], "cannot read the model config"),
        "not a gguf": (["--model", str(not_gguf)], "not a GGUF file"),
        "missing dataset": (["--model", m, "--data", str(tmp_path / "none.jsonl")], "no such file"),
        "empty dataset": (["--model", m, "--data", str(empty)], "no records"),
        "malformed line": (["--model", m, "--data", str(malformed)], "malformed.jsonl:2: not valid JSON"),
        "JSON array without a comma": (["--model", m, "--data", str(array)], "array.json:3: not valid JSON (Expecting ','"),
        "non-UTF-8 data": (["--model", m, "--data", str(latin1)], "latin1.jsonl:2: not UTF-8"),
        "binary data": (["--model", m, "--data", str(binary)], "looks binary"),
        "wrong fields": (["--model", m, "--data", str(wrong)], "wrong.jsonl:1: unknown record (keys: completion, prompt)"),
        "wrong field type": (["--model", m, "--data", str(wrong_type)], 'needs a string "output"'),
        "a 100 MB line": (["--model", m, "--data", str(huge)], "huge.jsonl:1: the line is 100 MiB"),
        "data is a directory": (["--model", m, "--data", str(tmp_path)], "is a directory"),
        "bad vram": (["--vram", "twelve"], "GB means GiB"),
        "zero vram": (["--vram", "0GB"], "must be larger than zero"),
        "vram below the CUDA context": (["plan", "--vram", "256MB"], "less than the CUDA context"),
        "unknown gpu": (["--gpu", "rtx4071", "--model", m, "--data", d], "did you mean rtx4070"),
        "unknown model preset": (["plan", "--model", "llama-9b-nope", "--vram", "12GB"], "not a known model preset"),
        "seq-len beyond the context": (["--model", m, "--data", d, "--seq-len", "4096"], "context of 512 tokens; use --seq-len 512"),
        "occupied out": (["--model", m, "--data", d, "--out", str(occupied)], "already holds a run"),
        "unwritable out": (["--model", m, "--data", d, "--out", "/proc/tinytune-run"], "cannot write in /proc"),
        "rank 0": (["--rank", "0"], "--rank 0 must be a positive"),
        "batch 0": (["--batch", "0"], "--batch 0 must be a positive whole number"),
        "rank too big": (["--model", m, "--data", d, "--rank", "4096"], "--rank 4096 is larger than layer"),
        "unknown technique": (["--technique", "magic"], "--technique 'magic' is unknown"),
        "bad bits": (["--bits", "3"], "--bits 3 is not supported"),
        "not a number": (["--rank", "big"], "invalid int value"),
        "unknown flag": (["--frobnicate"], "unrecognized arguments"),
        "full at 4 bits": (["--technique", "full", "--bits", "4"], "--technique full with --bits 4"),
        "vera rank too big": (["--model", m, "--data", d, "--technique", "vera", "--rank", "200"],
                              "larger than VeRA's shared matrices allow"),
        "negative lr": (["--lr", "-1"], "--lr -1.0 must be positive"),
        "dropout 1": (["--dropout", "1"], "--dropout 1.0 must be in [0, 1)"),
        "nan lr": (["--lr", "nan"], "--lr nan must be a finite number"),
        "infinite epochs": (["--epochs", "inf"], "--epochs inf must be a finite number"),
        "negative max-grad-norm": (["--max-grad-norm", "-1"], "--max-grad-norm -1.0 must be 0 or more"),
        "negative eval-every": (["--eval-every", "-1"], "--eval-every -1 must be 0 or more"),
        "bad save-every": (["--save-every", "sometimes"], "--save-every 'sometimes' is not a step count"),
        "keep no checkpoints": (["--keep-checkpoints", "0"], "--keep-checkpoints 0 must be at least 1"),
        "offload without checkpoints": (["--offload-checkpoints", "--no-gradient-checkpointing"],
                                        "--offload-checkpoints moves gradient checkpoints"),
        "zero mlp tiles": (["--mlp-tiles", "0"], "--mlp-tiles 0 must be a positive"),
        "negative plain layers": (["--plain-layers", "-1"], "--plain-layers -1 must be 0 or more"),
        "plain layers without checkpointing": (["--plain-layers", "2", "--no-gradient-checkpointing"],
                                               "leaves layers out of gradient checkpointing, which is off"),
        "plain layers beyond the model": (["--model", m, "--data", d, "--plain-layers", "99"],
                                          "decoder layers; use at most"),
        "plan with every layer plain": (["plan", "--model", "llama-3.1-8b", "--vram", "12GB", "--plain-layers", "32"],
                                        "llama-3.1-8b has 32 decoder layers; use at most 31"),
        "unknown compile": (["--model", m, "--data", d, "--compile", "maybe"], "--compile 'maybe' is unknown"),
        "export of nothing": (["export", str(tmp_path), "--out", str(tmp_path / "x")], "not a tinytune run directory"),
        "export with a bad shard size": (["export", str(finished_run), "--out", str(tmp_path / "x"), "--max-shard-size",
                                          "huge"], "--max-shard-size 'huge' is not a size: write it like 200MB, 2GB or 2GiB"),
        "export of a corrupt adapter": (["export", str(corrupt_adapter), "--out", str(tmp_path / "x")],
                                        "not a readable safetensors file"),
        "export of a future run format": (["export", str(future), "--out", str(tmp_path / "x")], "run format 99"),
        "export with a bad dtype": (["export", str(finished_run), "--out", str(tmp_path / "x"), "--dtype", "int4"],
                                    "--dtype 'int4' is unknown"),
        "resume of nothing": (["--resume", str(tmp_path)], "not a tinytune run directory"),
        "resume of a future run format": (["--resume", str(future)], "run format 99"),
        "resume of a finished run": (["--resume", str(finished_run)], "finished all 2 steps; nothing to resume"),
        "resume before any checkpoint": (["--resume", str(no_ckpt)], "no checkpoint yet"),
        "resume with other settings": (["--resume", str(finished_run), "--rank", "8"], "drop --rank"),
    }


CASES = ["missing model", "non-causal model", "unsupported architecture", "corrupt safetensors weights",
         "corrupt gguf", "not a gguf", "missing dataset", "empty dataset", "malformed line", "JSON array without a comma",
         "non-UTF-8 data",
         "binary data", "wrong fields", "wrong field type", "a 100 MB line", "data is a directory", "bad vram",
         "zero vram", "vram below the CUDA context", "unknown gpu", "unknown model preset",
         "seq-len beyond the context", "occupied out", "unwritable out", "rank 0", "batch 0", "rank too big",
         "unknown technique", "bad bits", "not a number", "unknown flag", "full at 4 bits", "vera rank too big",
         "negative lr", "dropout 1", "nan lr", "infinite epochs", "negative max-grad-norm", "negative eval-every",
         "bad save-every", "keep no checkpoints", "offload without checkpoints", "zero mlp tiles",
         "negative plain layers", "plain layers without checkpointing", "plain layers beyond the model",
         "plan with every layer plain", "unknown compile",
         "export of nothing",
         "export with a bad shard size", "export of a corrupt adapter", "export of a future run format", "export with a bad dtype",
         "resume of nothing", "resume of a future run format", "resume of a finished run",
         "resume before any checkpoint", "resume with other settings"]


def tree(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size if p.is_file() else -1) for p in path.rglob("*"))


def test_the_table_is_complete(bad_inputs):
    assert sorted(CASES) == sorted(bad_inputs) and len(CASES) >= 30


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_inputs, tmp_path, finished_run, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, message = bad_inputs[case]
    if "--out" not in argv and argv[0] not in ("export", "plan") and "--resume" not in argv:
        argv = argv + ["--out", str(tmp_path / "run")]
    before, before_run = tree(tmp_path), tree(finished_run)
    code, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("tinytune: error: "), err
    assert message in err, err
    assert "Traceback" not in err
    assert tree(tmp_path) == before  # nothing half-written, nothing removed
    assert tree(finished_run) == before_run


def test_real_process_exit_code_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "tinytune", "--vram", "12 XB"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tinytune: error: --vram '12 XB' is not a memory size: write it like 12GB, 12 GB, 12GiB, 12000MiB or 12g "
        "(GB means GiB, 2^30 bytes, as on a GPU's box)"
    ]


def test_cli_trains_and_exports_end_to_end(tiny_model_dir, demo_file, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["--vram", "12GB", "--model", str(tiny_model_dir), "--data", str(demo_file), "--out", str(run_dir),
                 "--max-steps", "2", "--seq-len", "128", "--rank", "4", "--no-sample"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "step 2/2" in out.err and "eval loss before training" in out.err
    assert json.loads((run_dir / "plan.json").read_text())["budget_gib"] == 12.0
    assert not (run_dir / ".lock").exists()  # a finished trainer lets go of its run
    assert f"tinytune export {run_dir})" in out.out  # the way to export, as printed
    assert main(["export", str(run_dir)]) == 0  # into RUN_DIR/merged
    assert (run_dir / "merged" / "config.json").is_file()
    code, err = run_cli(capsys, "export", str(run_dir))
    assert code == 2 and "already holds a model" in err and "--overwrite" in err
    code, err = run_cli(capsys, "--model", str(tiny_model_dir), "--data", str(demo_file), "--out", str(run_dir))
    assert code == 2 and "already holds a run" in err and "--overwrite" in err


def test_trainers_started_in_the_same_second_get_a_default_run_directory_each(tiny_model_dir, demo_file, tmp_path,
                                                                             capsys, monkeypatch):
    """Without --out the run directory is runs/<time>-<model>: a second run started in the same second
    (a sweep's script) takes <time>-<model>-2 instead of being refused the first's directory."""
    from tinytune import rundir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rundir, "default_path", lambda name: Path("runs") / f"20261123-120000-{name}")
    base = tmp_path / "runs" / f"20261123-120000-{tiny_model_dir.name}"
    for _ in range(2):
        code = main(["--model", str(tiny_model_dir), "--data", str(demo_file), "--max-steps", "1", "--seq-len", "64",
                     "--rank", "2", "--no-sample", "--batch", "2", "--grad-accum", "1", "--eval-fraction", "0"])
        assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [base.name, f"{base.name}-2"]
    assert all((p / "adapter.safetensors").is_file() for p in (base, base.with_name(f"{base.name}-2")))
    assert f"saved runs/{base.name}-2 " in capsys.readouterr().out

    # the name is claimed by mkdir, which one process wins: 16 at once get 16 directories
    from concurrent.futures import ThreadPoolExecutor

    race = tmp_path / "race" / "20261123-120001-m"
    with ThreadPoolExecutor(16) as pool:
        made = list(pool.map(lambda _: rundir.create(race, False, numbered=True), range(16)))
    assert len(set(made)) == 16 and all(p.is_dir() for p in made)


def test_a_run_being_trained_is_not_resumed_or_overwritten_by_a_second_trainer(finished_run, tmp_path, capsys):
    """While a trainer holds a run directory (here another process holding its lock, as a live run
    does), --resume, --out with --overwrite and export --overwrite into it are refused with its pid
    and nothing changes; once that process is killed the lock is gone with it."""
    from tinytune.rundir import RunLock, check_output

    run = _copy_run(finished_run, tmp_path / "live")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from tinytune.rundir import RunLock; "
         "RunLock().take(Path(sys.argv[1]), '--out'); print('held', flush=True); time.sleep(120)", str(run)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert RunLock.holder(run) == holder.pid
        before = tree(run)
        for argv, message in (
            (["--resume", str(run)], f"--resume {run}: a tinytune run (pid {holder.pid}) is training it now"),
            (["--out", str(run), "--overwrite", "--max-steps", "1"], f"--out {run}: a tinytune run (pid {holder.pid})"),
            (["export", str(finished_run), "--out", str(run), "--overwrite"], f"(pid {holder.pid}) is training it now"),
        ):
            code, err = run_cli(capsys, *argv)
            assert code == 2 and message in err and len(err.splitlines()) == 1, err
            assert tree(run) == before
    finally:
        holder.kill()
        holder.wait()
    assert RunLock.holder(run) is None  # the kernel dropped it with the process; the file alone stops nothing
    killed_early = tmp_path / "killed-early"  # a trainer killed between taking the lock and its first record
    killed_early.mkdir()
    (killed_early / ".lock").write_text(str(holder.pid))
    check_output(killed_early, overwrite=False)  # no run there: no --overwrite needed
