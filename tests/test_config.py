import pytest
from hypothesis import given, strategies as st

from tinytune.config import GIB, TrainConfig, parse_vram
from tinytune.errors import UserError


@pytest.mark.parametrize("text,expected", [
    ("12GB", 12 * GIB), ("12 GB", 12 * GIB), ("12GiB", 12 * GIB), ("12g", 12 * GIB), ("12G", 12 * GIB),
    ("12000MiB", 12000 * 2**20), ("12000MB", 12000 * 2**20), ("1.5GB", int(1.5 * GIB)), ("12", 12 * GIB),
    (" 24gb ", 24 * GIB),
])
def test_parse_vram_accepts_the_usual_spellings(text, expected):
    assert parse_vram(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "twelve", "12XB", "-12GB", "12 G B", "0GB", "12GB12", "1e3GB"])
def test_parse_vram_rejects_with_one_line_that_says_gib(text):
    with pytest.raises(UserError) as e:
        parse_vram(text)
    assert "\n" not in str(e.value) and "--vram" in str(e.value)


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["MiB", "MB", "m", "GiB", "GB", "g"]),
       st.sampled_from(["", " "]))
def test_parse_vram_property(n, unit, space):
    factor = 2**20 if unit.lower().startswith("m") else GIB
    assert parse_vram(f"{n}{space}{unit}") == n * factor


@given(st.text(max_size=12))
def test_parse_vram_never_crashes(text):
    try:
        assert parse_vram(text) > 0
    except UserError as e:
        assert "\n" not in str(e)


@pytest.mark.parametrize("field,value", [
    ("rank", 0), ("rank", -4), ("bits", 3), ("technique", "dora"), ("optim", "sgd"), ("dropout", 1.0),
    ("seq_len", 0), ("micro_batch", 0), ("eval_fraction", 0.7), ("lr", 0), ("max_steps", 0), ("targets", ()),
    ("lr", float("inf")), ("alpha", float("nan")), ("epochs", float("nan")), ("lora_plus_ratio", float("inf")),
    ("weight_decay", -0.1), ("max_grad_norm", -1.0), ("eval_every", -1), ("vera_d_init", 0.0), ("delta_lambda", -1.0),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(UserError):
        TrainConfig(**{field: value})


def test_config_round_trips(tmp_path):
    cfg = TrainConfig(rank=8, alpha=16, targets=("q_proj", "v_proj"), vram=12 * GIB)
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg
    assert cfg.scaling == 2.0
    assert TrainConfig(rank=16, alpha=32, rslora=True).scaling == 8.0
