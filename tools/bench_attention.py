"""Attention with an (s, s) mask (transformers') against tinytune's, on packed rows or past a window.

    python tools/bench_attention.py [--model smollm2-135m] [--layers 2] [--tokens 2048] [--examples 16]
    python tools/bench_attention.py --model gemma-3-1b --tokens 4096 --examples 1   # windowed layers
    python tools/bench_attention.py --model llama-3.1-8b --layers 4 --bits 4 --rows 2   # on a GPU

A random-init model of ``--model``'s shape cut to ``--layers`` decoder layers (bf16 on CUDA, fp32 on
a CPU; ``--bits 4`` for an NF4 base), LoRA r16 on every linear layer, gradient checkpointing off.
Each of ``--rows`` rows of ``--tokens`` tokens holds ``--examples`` examples of seeded random
lengths, positions restarting at each, as ``--pack`` makes them (``--examples 1``: unpacked rows).
The training step (forward with tinytune's loss, backward) runs with:

- ``transformers``: its SDPA attention, which builds a (rows, 1, s, s) mask from the position ids and
  for windowed layers past their window: k and v expanded to every head, the mask kept as an
  additive bias by every such layer, and every score it hides computed;
- ``tinytune``: tinytune.attention as a run that packs has it: SDPA on each example alone, causal, a
  layer past its window in tiles of its window's keys.

Printed per way: best-of-``--repeats`` step time and its ratio to ``transformers`` (same run), what
autograd keeps per token and layer (saved-tensor hooks, each storage once, over the layers after the
first) next to the estimate's figure (which models tinytune's attention), and on CUDA the peak
allocated memory above the weights; then the largest differences of the loss and gradients.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def lengths(tokens: int, examples: int, seed: int) -> list[int]:
    """``examples`` seeded random lengths that add up to ``tokens``."""
    cuts = sorted(random.Random(seed).sample(range(1, tokens), examples - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, tokens])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--examples", type=int, default=16, help="examples per row (1: unpacked)")
    ap.add_argument("--bits", type=int, default=16, choices=(4, 8, 16))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.layers < 2:
        ap.error("--layers: at least 2 (the first layer is left out of what layers keep: it also keeps RoPE's tables)")

    import torch

    from tinytune import adapters, attention, loading, presets, train
    from tinytune.config import TrainConfig
    from tinytune.memory import estimate
    from tinytune.memory.probe import model_storages

    key, cfg = presets.model_config(args.model)
    cfg = {**cfg, "num_hidden_layers": args.layers}
    from transformers import AutoConfig

    config = AutoConfig.for_model(**cfg)
    config._attn_implementation = "sdpa"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = loading.compute_dtype(device)
    shape = estimate.ModelShape.from_config(config, name=key)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape.vocab, (args.rows, args.tokens), generator=gen).to(device)
    packed = torch.stack([torch.cat([torch.arange(n) for n in lengths(args.tokens, args.examples, seed=row)])
                          for row in range(args.rows)]).to(device)
    tokens = args.rows * args.tokens
    print(f"{key}, {args.layers} layers, {args.bits}-bit base, LoRA r16, {dtype}, {device.type}; {args.rows} × "
          f"{args.tokens} tokens, {args.examples} examples per row (row 0: {lengths(args.tokens, args.examples, 0)})")

    def build(way: str):
        model = loading.build_random(config, args.bits, device, dtype)
        if way == "tinytune":
            attention.install(model, packed=True)
        else:
            model.set_attn_implementation("sdpa")  # transformers' own, where loading gave windowed layers tinytune's
        adapters.apply(model, TrainConfig(technique="lora", rank=16, alpha=32, dropout=0.0, bits=args.bits))
        with torch.no_grad():  # B starts at zero: give it values so every path carries gradient
            for p in adapters.trainable(model):
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))
        model.train()
        return model

    def step(model, positions):
        batch = {"input_ids": ids, "labels": ids} | ({} if positions is None else {"position_ids": positions})
        loss_sum, n = train.forward_loss(model, batch, device, dtype)
        (loss_sum / n).backward()
        return (loss_sum / n).detach()

    rows, results = [], {}
    for way in ("transformers", "tinytune"):
        model = build(way)
        positions = packed
        own, seen, inside = model_storages(model), {}, []  # seen: storage → (first layer to keep it, bytes)
        for i, layer in enumerate(loading.decoder_layers(model)):
            layer.register_forward_pre_hook(lambda *_, i=i: inside.append(i))
            layer.register_forward_hook(lambda *_: inside.clear())

        def keep(t):
            ptr = t.untyped_storage().data_ptr()
            if inside and ptr not in own and ptr not in seen:
                seen[ptr] = (inside[-1], t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = step(model, positions)
        grads = {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        results[way] = (loss.float(), grads)
        times = []
        peak = None
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step(model, positions)
            if device.type == "cuda":
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            times.append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
        setup = estimate.Setup(technique="lora", rank=16, bits=args.bits, micro_batch=args.rows, seq_len=args.tokens,
                               dropout=0.0, device=device.type, packed=args.examples > 1)
        past_window = estimate.past_window_layers(shape, setup)[1:]
        predicted = None if way == "transformers" else (  # the estimate knows tinytune's attention only
            sum(estimate.layer_saved_bytes_per_token(shape, setup, w) for w in past_window) / (args.layers - 1)
            + estimate.layer_saved_fixed_bytes(shape, setup) / tokens)
        kept = sum(n for first, n in seen.values() if first > 0)  # RoPE's tables: the first layer's
        rows.append((way, min(times), kept / tokens / (args.layers - 1), predicted, peak))
        del model

    base_time = rows[0][1]
    print(f"{'way':<12} {'step ms':>9} {'ratio':>8} {'kept KiB/token/layer':>21} {'estimate':>9} {'peak GiB':>9}")
    for way, t, kept, predicted, peak in rows:
        print(f"{way:<12} {1000 * t:>9.0f} {t / base_time:>7.2f}× {kept / 1024:>21.1f} "
              f"{'—' if predicted is None else f'{predicted / 1024:.1f}':>9} "
              f"{'' if peak is None else f'{peak / 2**30:.3f}':>9}")
    (loss_a, grads_a), (loss_b, grads_b) = results["transformers"], results["tinytune"]
    worst = max(((grads_a[k] - grads_b[k]).abs().max() / grads_a[k].abs().max().clamp_min(1e-30)).item() for k in grads_a)
    print(f"tinytune against transformers: loss {loss_b.item():.6f} vs {loss_a.item():.6f} "
          f"(difference {abs(loss_b - loss_a).item():.2e}); largest gradient difference {worst:.2e} of the tensor's largest")


if __name__ == "__main__":
    main()
