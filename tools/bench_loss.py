"""The loss head of a training step: tinytune's chunked loss against the two usual ways, side by side.

    python tools/bench_loss.py [--model llama-3.1-8b] [--tokens 2048] [--repeats 5]
    python tools/bench_loss.py --model smollm2-135m --tokens 2048      # a CPU-sized head

For one model's output head (random weights, bf16 on CUDA, fp32 on a CPU) and ``--tokens`` hidden
states, each way computes the summed cross-entropy and its gradients (hidden states; the head
weight too with ``--train-head``), forward and backward:

- ``full``: the whole sequence's logits at once (what a model's own loss does);
- ``checkpointed``: chunks of ``--chunk`` tokens, each under a non-reentrant checkpoint, so one
  chunk's logits exist at a time and backward runs its head and softmax again;
- ``tinytune``: tinytune.loss, the same chunks with each chunk's gradient taken in forward.

Printed per way: best-of-``--repeats`` time (and the ratio to ``checkpointed``, in the same run), the
peak allocated memory above the inputs on CUDA, and the largest difference from ``full``'s loss and
gradients.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, help="tokens per chunk (default: what the trainer takes for the vocabulary)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-head", action="store_true", help="the head weight trains too (full fine-tuning)")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from tinytune import presets
    from tinytune.loss import _chunk_loss_sum, causal_lm_loss_sum
    from tinytune.memory.estimate import loss_chunk_tokens

    shape = presets.model_shape(args.model)
    args.chunk = args.chunk or loss_chunk_tokens(shape.vocab)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    head = torch.nn.Linear(shape.hidden, shape.vocab, bias=False, device=device, dtype=dtype)
    head.weight.data.normal_(0, 0.02, generator=gen)
    head.requires_grad_(args.train_head)
    hidden = torch.randn(1, args.tokens + 1, shape.hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
    labels = torch.randint(0, shape.vocab, (1, args.tokens + 1), device=device, generator=gen)

    def full():
        logits = head(hidden[:, :-1]).float()
        return F.cross_entropy(logits.reshape(-1, shape.vocab), labels[:, 1:].reshape(-1), reduction="sum")

    def checkpointed():
        h, t = hidden[0, :-1], labels[0, 1:]
        total = 0
        for s in range(0, args.tokens, args.chunk):
            total = total + checkpoint(_chunk_loss_sum, head, h[s:s + args.chunk], t[s:s + args.chunk], None,
                                       use_reentrant=False)
        return total

    def tinytune():
        return causal_lm_loss_sum(head, hidden, labels, chunk=args.chunk)[0]

    def step(fn):
        hidden.grad = head.weight.grad = None
        loss = fn()
        loss.backward()
        return loss.detach(), [t.grad for t in (hidden, head.weight) if t.grad is not None]

    ways = {"full": full, "checkpointed": checkpointed, "tinytune": tinytune}
    results = {name: step(fn) for name, fn in ways.items()}  # warm-up, and the values to compare
    times = {name: [] for name in ways}
    peaks = {}
    for _ in range(args.repeats):
        for name, fn in ways.items():
            hidden.grad = head.weight.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            step(fn)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
            times[name].append(time.perf_counter() - start)
    ref_loss, ref_grads = results["full"]
    print(f"{args.model} head ({shape.hidden} × {shape.vocab:,}), {args.tokens:,} tokens, chunks of {args.chunk}, "
          f"{'head trained' if args.train_head else 'head frozen'}, {device.type} {str(dtype)[6:]}")
    print(f"{'way':<14}{'ms':>9}{'speed vs checkpointed':>23}{'peak GiB':>10}{'max |diff| vs full':>20}")
    for name in ways:
        loss, grads = results[name]
        diff = max([abs(float(loss - ref_loss))] + [float((g.float() - r.float()).abs().max()) for g, r in zip(grads, ref_grads)])
        best = min(times[name])
        print(f"{name:<14}{best * 1e3:>9.1f}{min(times['checkpointed']) / best:>22.2f}×"
              + (f"{peaks[name]:>10.2f}" if name in peaks else f"{'-':>10}") + f"{diff:>20.3g}")


if __name__ == "__main__":
    main()
