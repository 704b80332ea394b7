"""Bad input from the command line: one line on stderr, exit code 2, nothing written."""

import json
import os
import subprocess
import sys

import pytest

from conftest import write_jsonl
from tinytune.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def bad_inputs(tmp_path, tiny_model_dir, demo_file):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    malformed = write_jsonl(tmp_path / "malformed.jsonl", [{"text": "fine"}, '{"text": "oops"', {"text": "x"}])
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "config.json").write_text("{}")
    m, d = str(tiny_model_dir), str(demo_file)
    return {
        "missing model": (["--model", str(tmp_path / "nope")], "no such directory"),
        "non-causal model": (["--model", str(bert)], "not a causal language model"),
        "unsupported architecture": (["--model", str(gpt2)], "architecture 'gpt2' is not supported"),
        "missing dataset": (["--model", m, "--data", str(tmp_path / "none.jsonl")], "no such file"),
        "empty dataset": (["--model", m, "--data", str(empty)], "no records"),
        "malformed line": (["--model", m, "--data", str(malformed)], "malformed.jsonl:2: not valid JSON"),
        "bad vram": (["--vram", "twelve"], "GB means GiB"),
        "occupied out": (["--model", m, "--data", d, "--out", str(occupied)], "already holds a run"),
        "rank 0": (["--rank", "0"], "--rank 0 must be a positive"),
        "rank too big": (["--model", m, "--data", d, "--rank", "4096"], "--rank 4096 is larger than layer"),
        "unknown technique": (["--technique", "magic"], "--technique 'magic' is unknown"),
        "bad bits": (["--bits", "3"], "--bits 3 is not supported"),
        "not a number": (["--rank", "big"], "invalid int value"),
        "unknown flag": (["--frobnicate"], "unrecognized arguments"),
        "full at 4 bits": (["--technique", "full", "--bits", "4"], "--technique full with --bits 4"),
        "vera rank too big": (["--model", m, "--data", d, "--technique", "vera", "--rank", "200"],
                              "larger than VeRA's shared matrices allow"),
        "export of nothing": (["export", str(tmp_path), "--out", str(tmp_path / "x")], "not a tinytune run directory"),
    }


CASES = ["missing model", "non-causal model", "unsupported architecture", "missing dataset", "empty dataset",
         "malformed line", "bad vram", "occupied out", "rank 0", "rank too big", "unknown technique", "bad bits",
         "not a number", "unknown flag", "full at 4 bits", "vera rank too big", "export of nothing"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, bad_inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, message = bad_inputs[case]
    if "--out" not in argv and argv[0] != "export":
        argv = argv + ["--out", str(tmp_path / "run")]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("tinytune: error: "), err
    assert message in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written
    assert not (tmp_path / "runs").exists()


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
    assert "step 2/2" in out.err and "eval loss before training" in out.out
    assert json.loads((run_dir / "plan.json").read_text())["budget_gib"] == 12.0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    code, err = run_cli(capsys, "--model", str(tiny_model_dir), "--data", str(demo_file), "--out", str(run_dir))
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
