"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and small datasets."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from hypothesis import settings  # noqa: E402

# The same examples on every run, so a CI result does not depend on luck; run with
# HYPOTHESIS_PROFILE=explore to search afresh.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The embedded default model's real tokenizer (chat template included), saved as an HF dir.

    TINYTUNE_TEST_TOKENIZER names such a saved copy, for a machine without the default model."""
    from tinytune import loading

    if os.environ.get("TINYTUNE_TEST_TOKENIZER"):
        return Path(os.environ["TINYTUNE_TEST_TOKENIZER"])

    tok = loading.load_tokenizer(loading.resolve_source(None))
    path = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer random Llama (hidden 64) saved as a standard HF directory with the tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def demo_rows() -> list[dict]:
    from make_demo_data import make

    return make(48, seed=7)


@pytest.fixture
def demo_file(tmp_path, demo_rows) -> Path:
    return write_jsonl(tmp_path / "demo.jsonl", demo_rows)
