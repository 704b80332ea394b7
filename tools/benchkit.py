"""What the GPU benchmarks share: one configuration per fresh process, a CUDA memory cap, a tiny
shape for CPU smoke runs."""

from __future__ import annotations

import json
import subprocess
import sys

# --smoke: the model preset shrunk to this, so the code path runs on a CPU in seconds
TINY = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # special ids inside the small vocabulary


def run_in_fresh_process(script: str, spec: dict, echo_stderr: bool = False) -> dict:
    """Run ``script --one SPEC`` in a new process (no allocator state or OOM carries over) and return
    the JSON line it prints last, or ``spec`` with ``crash`` set to the last line of its stderr."""
    proc = subprocess.run([sys.executable, script, "--one", json.dumps(spec)], capture_output=True, text=True)
    if echo_stderr:
        print(proc.stderr[-20000:], file=sys.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {**spec, "crash": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def cap_cuda_memory(gib: float) -> None:
    """Make this process act as a card of ``gib`` GiB, as the trainer does for --vram."""
    import torch

    from tinytune.config import GIB
    from tinytune.memory.probe import cap_to_budget

    cap_to_budget(int(gib * GIB), torch.device("cuda", 0))


def train_step(model, optimizer, batch: dict, device, dtype) -> None:
    """One tinytune training step as the trainer takes it: the chunked loss, backward, the update."""
    from tinytune import train

    loss_sum, n = train.forward_loss(model, batch, device, dtype)
    (loss_sum / max(1, n)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
