"""The run directory: what a run leaves on disk, always written atomically (temp file + rename).

    RUN_DIR/config.json          resolved TrainConfig
    RUN_DIR/plan.json            technique, rank, bits, batch, seq_len, ... (+ predicted memory)
    RUN_DIR/metrics.jsonl        one record per optimizer step; eval records carry eval_loss
    RUN_DIR/adapter.safetensors  trainable adapter tensors, by module name
    RUN_DIR/peft/                the same adapter in PEFT's format
    RUN_DIR/checkpoints/         the newest periodic checkpoints (see checkpoint.py)
    RUN_DIR/.lock                held by the trainer writing the run (see RunLock)
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tinytune.errors import UserError

if TYPE_CHECKING:
    import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are not guarded against a second trainer
    fcntl = None

RUN_FILES = ("config.json", "plan.json", "metrics.jsonl", "adapter.safetensors", "peft", "checkpoints")
FORMAT_VERSION = 1
LOCK_FILE = ".lock"


def default_path(model_name: str) -> Path:
    """runs/<time>-<model>; ``create(..., numbered=True)`` adds -2, -3, ... if that is taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name) or "model"
    return Path("runs") / f"{stamp}-{safe}"


def newest_run(root: Path = Path("runs")) -> Path | None:
    """The run under ``root`` to watch when none is named: the newest one a trainer holds (live), else
    the newest by its last record."""
    runs = [d for d in root.iterdir() if (d / "plan.json").is_file()] if root.is_dir() else []

    def last_written(d: Path) -> float:
        return max((d / f).stat().st_mtime for f in ("plan.json", "metrics.jsonl") if (d / f).exists())

    live = [d for d in runs if RunLock.holder(d) is not None]
    return max(live or runs, key=last_written, default=None)


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse a directory that already holds something, unless told to overwrite."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path}: exists and is a file; choose a directory path")
    if path.is_dir() and (pid := RunLock.holder(path)):
        raise held(f"--out {path}", pid, " or choose another --out")
    if path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()) and not overwrite:
        if any(path.glob("model*.safetensors*")):
            holds = "a model"
        else:
            holds = "a run" if any((path / f).exists() for f in RUN_FILES) else "files"
        raise UserError(f"--out {path}: already holds {holds}; choose another --out or pass --overwrite to replace it")
    check_writable(path)


def check_writable(path: Path) -> None:
    """Refuse a path whose nearest existing parent this process cannot create a directory in."""
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    try:  # os.access says yes to root even on read-only mounts: try it
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".tinytune-probe-"))
    except OSError as e:
        raise UserError(f"--out {path}: cannot write in {parent} ({e.strerror}); choose a directory you can write to") from None


def create(path: Path, overwrite: bool, numbered: bool = False) -> Path:
    """Make the run directory and return it. ``numbered``: ``path`` is a default name, and if it is
    taken (another trainer started in the same second) the first free one of path-2, path-3, ... is
    made instead; mkdir is atomic, so two trainers never get the same one."""
    if numbered:
        for n in itertools.count(1):
            numbered_path = path if n == 1 else path.with_name(f"{path.name}-{n}")
            try:
                numbered_path.mkdir(parents=True)
                return numbered_path
            except FileExistsError:
                continue
            except OSError as e:
                raise UserError(f"--out {numbered_path}: cannot create the run directory ({e.strerror})") from None
    check_output(path, overwrite)
    try:
        if path.is_dir() and overwrite:
            clear(path)
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {path}: cannot create the run directory ({e.strerror})") from None
    return path


def clear(path: Path) -> None:
    """Remove what a directory holds, keeping the directory."""
    for child in path.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def held(what: str, pid: int, alternative: str = "") -> UserError:
    """A run directory another trainer holds (see RunLock)."""
    return UserError(f"{what}: a tinytune run (pid {pid}) is training it now; stop it first (q in its terminal UI, "
                     f"Ctrl-C, or kill -TERM {pid}){alternative}")


class RunLock:
    """The trainer writing a run directory holds an advisory lock (flock) on RUN_DIR/.lock from before
    its first write to its end, so that a second trainer (--resume, --overwrite, the same --out) is
    refused meanwhile instead of writing over it. The kernel drops the lock when the process ends,
    however it ends: a killed run leaves no stale lock, only the file."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.path: Path | None = None

    @staticmethod
    def guarded(run_dir: Path) -> bool:
        """Whether a trainer has locked ``run_dir`` (and may still hold it): the lock file exists."""
        return fcntl is not None and (run_dir / LOCK_FILE).exists()

    @staticmethod
    def holder(run_dir: Path) -> int | None:
        """The pid of a live trainer holding ``run_dir`` (-1 when it has not written it yet), else None."""
        if fcntl is None:
            return None
        try:
            fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted unless a trainer holds it
            return None
        except BlockingIOError:
            return _pid_in(fd)
        finally:
            os.close(fd)

    def take(self, run_dir: Path, flag: str) -> None:
        """Hold ``run_dir`` for this process, or raise UserError naming the trainer that holds it."""
        if fcntl is None:
            return
        path = run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # os.open applies the umask itself
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _pid_in(fd)
            os.close(fd)
            raise held(f"{flag} {run_dir}", pid) from None
        except OSError:  # a filesystem without locks: train unguarded, and leave no file that suggests a lock
            os.close(fd)
            path.unlink(missing_ok=True)
            return
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_in(fd: int) -> int:
    """The pid a lock holder wrote into its lock file (-1 when it has not written it yet)."""
    return int(os.read(fd, 32) or -1)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path) -> None:
    """Give a temp file or directory (created 0600/0700) the permissions a normal write would have."""
    mask = _umask()
    if path.is_dir():
        path.chmod(0o777 & ~mask)
        for child in path.rglob("*"):
            child.chmod((0o777 if child.is_dir() else 0o666) & ~mask)
    else:
        path.chmod(0o666 & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file  # here: the monitor, which reads this module, starts without torch

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path}: missing; the run has saved neither its adapter nor a checkpoint yet "
                        "(export it after its first checkpoint, or when it ends)")
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:200]}); it may be corrupt") from None


def write_failed(path: Path, e: OSError, then: str | None = None, what: str = "") -> UserError:
    """One line for a write into a run directory that failed (a full disk, permissions taken away).
    ``then``: what to do after making room; by default resume from the newest checkpoint, if any.
    ``what``: what could not be written, where the path does not say it."""
    run_dir = path.parent
    if then is None:
        from tinytune import checkpoint  # which imports this module

        then = f"resume with: tinytune --resume {run_dir}" if checkpoint.complete(run_dir) else "start the run again with --overwrite"
    return UserError(f"{path}: cannot write{f' {what}' if what else ''} ({e.strerror or e}); free space or fix the "
                     f"directory's permissions, then {then}")


class MetricsWriter:
    """Appends one JSON object per line and flushes it, so a monitor can follow the file live."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.file = open(path, "a", buffering=1)
        except OSError as e:
            raise write_failed(path, e) from None

    def write(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            self.close()  # a resumed run drops the cut-off line
            raise write_failed(self.path, e) from None

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the buffered rest of a line that could not be written
            pass


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records of steps after ``step`` (written by a run that died before checkpointing them);
    returns how many were dropped. Unreadable lines (a write cut off by a kill) go too."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped
