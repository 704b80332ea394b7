"""Crash-safe checkpoints: everything a run needs to continue bit for bit, written atomically.

    RUN_DIR/checkpoints/step-00000120/
        adapter.safetensors   the adapter (same format as RUN_DIR/adapter.safetensors)
        trainer.safetensors   optimizer state tensors and RNG states
        state.json            step, data position, optimizer/scheduler/scaler settings, run format

A checkpoint is written into a hidden temporary directory, every file fsynced, then renamed into
place: a directory named ``step-*`` is complete by construction, and a kill at any moment leaves the
previous checkpoint untouched. The last ``keep`` checkpoints are kept.

Nothing is unpickled on load: tensors come from safetensors, everything else from JSON. Optimizer
state dicts (torch's AdamW, bitsandbytes' 8-bit and paged AdamW) are split into a JSON skeleton and
a flat tensor file; tuples and integer keys survive the round trip.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tinytune import adapters, rundir
from tinytune.errors import UserError

DIRNAME = "checkpoints"
FORMAT = 2
"""state.json's format. 2: the optimizer's state is over flat parameter groups (``tinytune.optim``);
format 1 held one state per tensor."""
STEP_RE = re.compile(r"^step-(\d{8})$")


class FormatError(UserError):
    """A checkpoint another version of tinytune wrote: readable by that version, not damaged."""

# --- JSON skeleton + flat tensors -------------------------------------------------------------------

def _split(obj, tensors: dict[str, torch.Tensor], seen: dict[tuple, str], path: str):
    """Replace every tensor in ``obj`` by {"__tensor__": key}; shared tensors are stored once."""
    if isinstance(obj, torch.Tensor):
        ident = (obj.data_ptr(), obj.dtype, tuple(obj.shape), tuple(obj.stride())) if obj.numel() else None
        if ident is not None and ident in seen:
            return {"__tensor__": seen[ident]}
        key = path or "tensor"
        tensors[key] = obj.detach().to("cpu").contiguous()
        if ident is not None:
            seen[ident] = key
        return {"__tensor__": key}
    if isinstance(obj, dict):
        items = [[k, _split(v, tensors, seen, f"{path}/{k}")] for k, v in obj.items()]
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return dict(items)
        return {"__items__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_split(v, tensors, seen, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split(v, tensors, seen, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path}")


def _join(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_join(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: _join(v, tensors) for k, v in obj["__items__"]}
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


# --- save -------------------------------------------------------------------------------------------

def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state(device: torch.device) -> tuple[dict, dict[str, torch.Tensor]]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if device.type == "cuda":
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss]}, tensors


def set_rng_state(info: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if device.type == "cuda":
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(run_dir: Path, step: int, model, optimizer, schedule, scaler, device: torch.device, trainer: dict,
         keep: int) -> Path:
    """Write checkpoint ``step`` atomically and keep the newest ``keep``; returns its directory.

    ``trainer`` holds the loop's own JSON state (data position, OOM split, ...). A failure (disk
    full, no permission) leaves no partial directory and the older checkpoints intact.
    """
    root = run_dir / DIRNAME
    final = root / f"step-{step:08d}"
    tmp = None
    try:
        root.mkdir(exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:08d}.", suffix=".tmp"))
        tensors: dict[str, torch.Tensor] = {}
        skeleton = _split(optimizer.state_dict(), tensors, {}, "optimizer")
        rng_info, rng_tensors = rng_state(device)
        tensors.update(rng_tensors)
        state = {
            "format": FORMAT, "step": step, "time": time.time(), "trainer": trainer,
            "optimizer": skeleton, "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "rng": rng_info,
        }
        save_file(adapters.state(model), str(tmp / "adapter.safetensors"), metadata={"step": str(step)})
        save_file(tensors, str(tmp / "trainer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        rundir.publish_mode(tmp)
        if final.exists():  # the same step saved again (a stop right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        tmp = None
        _fsync_dir(root)
    except OSError as e:
        raise rundir.write_failed(root, e, f"resume with: tinytune --resume {run_dir}",
                                  what=f"checkpoint step {step}") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    for old in complete(run_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --- load -------------------------------------------------------------------------------------------

def complete(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories, newest first."""
    root = run_dir / DIRNAME
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)]
    return sorted(found, key=step_of, reverse=True)


def step_of(path: Path) -> int:
    """The step of a checkpoint directory, from its name (step-00000120 → 120)."""
    return int(STEP_RE.match(path.name).group(1))


def remove_partial(run_dir: Path) -> None:
    """Temporary directories of a checkpoint that was being written when the process died."""
    root = run_dir / DIRNAME
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step-") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict
    adapter: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]


def read(path: Path) -> Checkpoint:
    """Read and check one checkpoint directory; a damaged one raises UserError naming the file."""
    state_path = path / "state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{state_path}: unreadable ({e.__class__.__name__}); the checkpoint is damaged") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise (FormatError if isinstance(found, int) else UserError)(
            f"{path}: checkpoint format {found!r}, this tinytune reads format {FORMAT}; "
            "resume it with the tinytune version that wrote it")
    tensors = {}
    for name in ("adapter.safetensors", "trainer.safetensors"):
        try:
            tensors[name] = load_file(str(path / name))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise UserError(f"{path / name}: not a readable safetensors file ({str(e).splitlines()[0][:160]}); "
                            "the checkpoint is damaged") from None
    return Checkpoint(path, int(state["step"]), state, tensors["adapter.safetensors"], tensors["trainer.safetensors"])


def latest_readable(run_dir: Path, warn) -> Checkpoint | None:
    """The newest checkpoint that reads back; damaged newer ones are reported and skipped. One written
    in another format is not damaged (and the ones before it are no newer): that stops the search."""
    for path in complete(run_dir):
        try:
            return read(path)
        except FormatError:
            raise
        except UserError as e:
            warn(f"warning: skipping a damaged checkpoint: {e}")
    return None


def restore(ckpt: Checkpoint, model, optimizer, schedule, scaler, device: torch.device) -> None:
    """Load a checkpoint into freshly built objects of the same run. Call last: it sets the RNGs."""
    try:
        adapters.load_state(model, ckpt.adapter)
    except ValueError as e:
        raise UserError(f"{ckpt.path / 'adapter.safetensors'}: {e}") from None
    on_device = {k: v.to(device) if k.startswith("optimizer") else v for k, v in ckpt.tensors.items()}
    try:
        optimizer.load_state_dict(_join(ckpt.state["optimizer"], on_device))
    except (KeyError, ValueError) as e:
        raise UserError(f"{ckpt.path}: optimizer state does not fit this run ({e})") from None
    _repage(optimizer)
    schedule.load_state_dict(ckpt.state["schedule"])
    if ckpt.state["scaler"]:
        scaler.load_state_dict(ckpt.state["scaler"])
    set_rng_state(ckpt.state["rng"], ckpt.tensors, device)


def _repage(optimizer) -> None:
    """bitsandbytes' paged optimizers keep large states in paged (unified) memory; a loaded state
    is ordinary device memory, so copy it back into paged buffers where the optimizer would use them."""
    get_buffer = getattr(optimizer, "get_state_buffer", None)
    if get_buffer is None or not getattr(optimizer, "is_paged", False):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in ("state1", "state2"):
                t = state.get(key)
                if isinstance(t, torch.Tensor) and t.device.type == "cuda" and t.shape == p.shape:
                    buf = get_buffer(p, dtype=t.dtype)
                    buf.copy_(t)
                    state[key] = buf
