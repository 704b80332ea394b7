"""GPU profiles and model-shape presets, read from the JSON files in ``profiles/``.

Names are matched loosely ("RTX 4070", "rtx-4070", "rtx4070" are one GPU; a model preset also
answers to its Hugging Face id); an unknown name gets the closest known ones as a suggestion.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from tinytune.config import GIB
from tinytune.errors import UserError
from tinytune.memory.estimate import ModelShape


@dataclass(frozen=True)
class GPUProfile:
    key: str
    name: str
    vram_bytes: int
    bf16: bool
    bandwidth_gbs: float
    bf16_tflops: float


def _profiles_dir():
    """profiles/ of a source checkout (editable install), else the installed tinytune.profiles."""
    checkout = Path(__file__).resolve().parent.parent / "profiles"
    if checkout.is_dir():
        return checkout
    return resources.files("tinytune.profiles")


@lru_cache(maxsize=None)
def _load(file: str) -> dict[str, dict]:
    text = _profiles_dir().joinpath(file).read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.lower().removeprefix("nvidia").removeprefix("geforce"))


def _lookup(kind: str, name: str, table: dict[str, dict], aliases: dict[str, str]) -> str:
    wanted = _norm(name)
    for key in table:
        if _norm(key) == wanted:
            return key
    if wanted in aliases:
        return aliases[wanted]
    prefixed = [k for k in table if _norm(k).startswith(wanted)]
    if len(prefixed) == 1:
        return prefixed[0]
    close = prefixed or difflib.get_close_matches(name.lower(), list(table), n=3, cutoff=0.4)
    hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(table)}"
    what = "GPU profile" if kind == "--gpu" else "model preset, local model directory or .gguf file"
    raise UserError(f"{kind} {name!r} is not a known {what}; {hint}")


def gpu_names() -> list[str]:
    return list(_load("gpus.json"))


def gpu(name: str) -> GPUProfile:
    table = _load("gpus.json")
    aliases = {_norm(v["name"]): k for k, v in table.items()}
    key = _lookup("--gpu", name, table, aliases)
    p = table[key]
    return GPUProfile(key, p["name"], int(p["vram_gib"] * GIB), p["bf16"], p["bandwidth_gbs"], p["bf16_tflops"])


def gpu_for_device_name(device_name: str) -> GPUProfile | None:
    """The profile of a detected GPU (``torch.cuda.get_device_name``: "NVIDIA GeForce RTX 4070",
    "NVIDIA A100-SXM4-80GB"), if there is one."""
    wanted = _norm(device_name)
    best = None
    for key in _load("gpus.json"):
        model, _, size = key.partition("-")
        if model in wanted and (not size or size in wanted):
            if best is None or len(key) > len(best):
                best = key
    return gpu(best) if best else None


def model_names() -> list[str]:
    return list(_load("models.json"))


def is_model_preset(name: str) -> bool:
    try:
        model_config(name)
        return True
    except UserError:
        return False


def model_config(name: str) -> tuple[str, dict]:
    table = _load("models.json")
    aliases = {}
    for key, v in table.items():
        # the hub id with and without its organisation, of the instruct model and of its base (same shape)
        base = v["hf_id"].replace("-Instruct", "").removesuffix("-it")
        for hub_id in (v["hf_id"], base):
            aliases |= {_norm(hub_id): key, _norm(hub_id.split("/")[1]): key}
    key = _lookup("--model", name, table, aliases)
    return key, {k: v for k, v in table[key].items() if k != "hf_id"}


def model_shape(name: str) -> ModelShape:
    key, cfg = model_config(name)
    return ModelShape.from_config(cfg, name=key)
