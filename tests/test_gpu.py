"""The CUDA paths: bf16 autocast, pinned offload, bitsandbytes' CUDA kernels, the allocator figures.

Skipped without a CUDA GPU (CI has none); the CPU suite covers the same code on the CPU.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from tinytune import adapters, export, fast, loading, memsave, train
from tinytune.config import TrainConfig
from tinytune.loss import causal_lm_loss_sum

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def test_chunked_loss_equals_full_loss_in_bf16():
    gen = torch.Generator(device=CUDA).manual_seed(0)
    head = torch.nn.Linear(256, 32000, bias=False, device=CUDA, dtype=torch.bfloat16)
    hidden = torch.randn(2, 1500, 256, device=CUDA, dtype=torch.bfloat16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 32000, (2, 1500), device=CUDA, generator=gen)
    labels[1, 1000:] = -100
    results = []
    for chunk in (0, 512):
        hidden.grad = head.weight.grad = None
        loss, n = causal_lm_loss_sum(head.requires_grad_(True), hidden, labels, chunk=chunk)
        (loss / n).backward()
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    (full, g_full, w_full), (chunked, g_chunked, w_chunked) = results
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(g_chunked.float(), g_full.float(), rtol=2e-2, atol=1e-6)
    torch.testing.assert_close(w_chunked.float(), w_full.float(), rtol=2e-2, atol=1e-5)


def test_the_loss_with_host_labels_never_waits_for_the_device():
    """The trainer passes labels from the host: counting each chunk's predicted tokens reads no device
    memory, so the forward's kernels queued before the loss need not finish first."""
    head = torch.nn.Linear(256, 32000, bias=False, device=CUDA, dtype=torch.bfloat16)
    hidden = torch.randn(1, 3000, 256, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 32000, (1, 3000))
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, n = causal_lm_loss_sum(head.requires_grad_(True), hidden, labels, chunk=512)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert n == 2999 and loss.device == CUDA


def _nonzero_adapters(model) -> None:
    with torch.no_grad():  # B starts at zero: give it values so every path carries gradient
        for p in adapters.trainable(model):
            p.normal_(0, 0.02, generator=torch.Generator(device=p.device).manual_seed(p.numel()))


def lora_grads(tiny_model_dir, setup, dropout: float = 0.0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = loading.load_model(loading.resolve_source(str(tiny_model_dir)), 4, CUDA)
    adapters.apply(model, TrainConfig(rank=4, alpha=8, dropout=dropout, bits=4))
    _nonzero_adapters(model)
    setup(model)
    model.train()
    ids = torch.randint(3, 2000, (2, 96), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    loss_sum, n = train.forward_loss(model, batch, CUDA, torch.bfloat16)
    (loss_sum / n).backward()
    return {name: p.grad.float() for name, p in model.named_parameters() if p.requires_grad}


def test_pinned_offload_and_tiles_give_the_gradients_of_plain_checkpointing(tiny_model_dir):
    plain = lora_grads(tiny_model_dir, memsave.enable_checkpointing)
    other = lora_grads(tiny_model_dir, lambda m: (memsave.offload_checkpoints(m), memsave.tile_mlp(m, 3)))
    assert plain.keys() == other.keys()
    for key in plain:
        assert plain[key].abs().sum() > 0, key
        torch.testing.assert_close(other[key], plain[key], rtol=2e-2, atol=1e-5, msg=key)


def _queue_lengths(monkeypatch, method: str, queue: str) -> list[int]:
    """The length of ``HostCopies.<queue>`` after every call of ``HostCopies.<method>``."""
    lengths, real = [], getattr(memsave.HostCopies, method)

    def spy(self, arg):
        out = real(self, arg)
        lengths.append(len(getattr(self, queue)))
        return out

    monkeypatch.setattr(memsave.HostCopies, method, spy)
    return lengths


def test_offloading_many_layers_waits_for_old_copies_and_keeps_the_gradients(monkeypatch):
    """Eight layers, more than ``COPIES_IN_FLIGHT``: the CPU waits for the oldest copies to host
    (at most that many outstanding after any save); in backward it waits until the GPU has begun the
    layer handed out before (at most ``FETCHES_AHEAD`` inputs handed out ahead of it after any
    fetch); and the gradients stay those of checkpointing."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    outstanding = _queue_lengths(monkeypatch, "pack", "copying")
    handed = _queue_lengths(monkeypatch, "unpack", "handed")
    ids = torch.randint(0, 1000, (1, 4096), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    grads = []
    for setup in (memsave.enable_checkpointing, memsave.offload_checkpoints):
        model = loading.build_random(config, 4, CUDA, torch.bfloat16)
        adapters.apply(model, TrainConfig(rank=4, alpha=8, dropout=0.0, bits=4))
        _nonzero_adapters(model)
        setup(model)
        model.train()
        loss_sum, n = train.forward_loss(model, batch, CUDA, torch.bfloat16)
        (loss_sum / n).backward()
        grads.append({name: p.grad.float() for name, p in model.named_parameters() if p.requires_grad})
    assert len(outstanding) == 8 and max(outstanding) == memsave.COPIES_IN_FLIGHT
    assert len(handed) == 8 and max(handed) == memsave.FETCHES_AHEAD
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=2e-2, atol=1e-5, msg=key)


def test_dropout_masks_drawn_again_on_cuda_give_the_gradients_of_plain_training(tiny_model_dir):
    """LoRA's dropout branch under bf16 autocast on CUDA: checkpointed + offloaded (last layer plain)
    recomputes with the same masks as a run without checkpointing."""
    plain = lora_grads(tiny_model_dir, lambda m: None, dropout=0.2)
    other = lora_grads(tiny_model_dir, lambda m: (memsave.offload_checkpoints(m), memsave.plain_last_layers(m, 1)),
                       dropout=0.2)
    for key in plain:
        torch.testing.assert_close(other[key], plain[key], rtol=2e-2, atol=1e-5, msg=key)


def test_compiled_dropout_masks_are_drawn_again_in_recomputed_layers(tiny_model_dir):
    """Compiled by inductor (generated kernels), LoRA's index-hash dropout draws its seed from the
    compiler's generator: checkpointed + offloaded layers (last one plain) must recompute the masks
    of the compiled run without checkpointing."""
    torch._dynamo.reset()
    plain = lora_grads(tiny_model_dir, fast.compile_layers, dropout=0.2)
    other = lora_grads(tiny_model_dir, lambda m: (memsave.offload_checkpoints(m), memsave.plain_last_layers(m, 1),
                                                  fast.compile_layers(m)), dropout=0.2)
    no_dropout = lora_grads(tiny_model_dir, fast.compile_layers)
    torch._dynamo.reset()
    assert any((plain[k] - no_dropout[k]).abs().max() > 1e-3 * no_dropout[k].abs().max() for k in plain)
    for key in plain:
        torch.testing.assert_close(other[key], plain[key], rtol=2e-2, atol=1e-5, msg=key)


@pytest.mark.parametrize("technique,bits", [("lora", 4), ("lora-fa", 4), ("vera", 8), ("delta-lora", 16), ("full", 16)])
def test_a_cuda_run_trains_reports_allocator_memory_and_exports(tiny_model_dir, demo_file, tmp_path, technique, bits):
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(demo_file), out=str(tmp_path / "run"), technique=technique,
                      bits=bits, rank=8, alpha=16, seq_len=128, micro_batch=4, grad_accum=2, lr=3e-3, max_steps=6,
                      eval_fraction=0.15, sample=False, seed=0, device="cuda")
    run_dir = train.run(cfg, stream=open("/dev/null", "w"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 6 and all(r["mem_peak_gib"] >= r["mem_allocated_gib"] > 0 for r in steps)
    assert all(r["mem_reserved_gib"] >= r["mem_allocated_gib"] for r in steps)
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < evals[0], evals
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["embeddings_on_host"] == (technique != "full")  # the tiny model's table is untied
    if technique != "full":
        merged = export.export(run_dir, tmp_path / "merged")
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(merged).dtype == torch.float16


def test_a_planned_cuda_run_calibrates_and_stays_under_its_budget(tiny_model_dir, demo_file, tmp_path):
    from tinytune.config import GIB

    log = io.StringIO()
    cfg = TrainConfig(model=str(tiny_model_dir), data=str(demo_file), out=str(tmp_path / "run"), vram=2 * GIB,
                      max_steps=4, eval_fraction=0.15, sample=False, seed=0, device="cuda")
    try:
        run_dir = train.run(cfg, stream=log)
        plan = json.loads((run_dir / "plan.json").read_text())
        assert "calibration:" in log.getvalue(), log.getvalue()
        assert "this process acts as a 2.00 GiB card (--vram 2GiB)" in log.getvalue()
        peaks = [json.loads(line).get("mem_peak_gib") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert max(p for p in peaks if p is not None) <= plan["budget_gib"]
        with pytest.raises(torch.OutOfMemoryError):  # the process acts as the 2 GiB card it planned for
            torch.empty(2 * GIB, dtype=torch.uint8, device=CUDA)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_a_compiled_4bit_layer_matches_bitsandbytes_and_holds_one_weight_at_a_time():
    """Triton-compiled, the 4-bit layers of an MLP (gate, up, down: 14,336 × 4,096 each in the 8B)
    give bitsandbytes' CUDA results, and their backward holds one dequantized weight at a time (the
    estimator's count), not the three at once that a fused dequantization kernel would hold."""
    from tinytune import quant

    torch.manual_seed(0)
    width, inner = 1024, 4096
    make = lambda i, o: quant.quantize_linear(torch.nn.Linear(i, o, bias=False), 4, CUDA, torch.bfloat16)  # noqa: E731
    gate, up, down = make(width, inner), make(width, inner), make(inner, width)
    mlp = lambda x: down(torch.nn.functional.silu(gate(x)) * up(x))  # noqa: E731
    x = torch.randn(1, 64, width, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    want = mlp(x)
    (want_grad,) = torch.autograd.grad(want.float().square().sum(), x)
    for q in (gate, up, down):
        quant.traceable_4bit(q)
    compiled = torch.compile(mlp, fullgraph=True)
    compiled(x)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = compiled(x)
    (got_grad,) = torch.autograd.grad(got.float().square().sum(), x)
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - base
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_grad, want_grad, rtol=2e-2, atol=2e-2)
    one_weight = width * inner * 2
    assert grown < 2 * one_weight, f"{grown / one_weight:.2f} dequantized weights' worth at the peak"
    torch._dynamo.reset()
