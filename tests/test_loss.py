import weakref

import pytest
import torch
import torch.nn.functional as F

from tinytune.loss import causal_lm_loss_sum


def test_chunked_loss_equals_full_loss_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(3, 50, 16, requires_grad=True)
    labels = torch.randint(0, 300, (3, 50))
    labels[0, :10] = -100
    labels[2, 40:] = -100

    full_logits = head(hidden[:, :-1]).float()
    want = F.cross_entropy(full_logits.reshape(-1, 300), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    want.backward()
    want_grad_h, want_grad_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.weight.grad = None

    got, n = causal_lm_loss_sum(head, hidden, labels, chunk=16)
    got.backward()
    assert n == int((labels[:, 1:] != -100).sum())
    # fp32 sums in a different order: agreement to 1e-5 relative
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, want_grad_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, want_grad_w, rtol=1e-5, atol=1e-6)


def _reference(head, hidden, labels, softcap=None):
    logits = head(hidden[:, :-1]).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def _grads(loss, tensors):
    loss.backward()
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcapped_loss_with_a_trainable_biased_head_matches_autograd(dtype):
    """Gradients reach the hidden states and every trainable head tensor, scaled by the incoming gradient."""
    torch.manual_seed(1)
    head = torch.nn.Linear(24, 200).to(dtype)
    hidden = torch.randn(2, 40, 24, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 200, (2, 40))
    labels[1, 5:30] = -100
    tensors = [hidden, head.weight, head.bias]
    want = _reference(head, hidden, labels, softcap=5.0)
    want_grads = _grads(want / 7, tensors)
    got, n = causal_lm_loss_sum(head, hidden, labels, chunk=12, softcap=5.0)
    got_grads = _grads(got / 7, tensors)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, want.float(), **tol)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w.float(), **tol)


def test_head_runs_once_per_chunk_with_targets_and_autograd_keeps_no_logits():
    """Chunks with nothing to predict are skipped; the rest run the head once (a checkpointed
    chunk would run it again in backward); after the forward autograd holds no logits."""
    torch.manual_seed(2)
    head = torch.nn.Linear(16, 500, bias=False).requires_grad_(False)
    hidden = torch.randn(1, 65, 16, requires_grad=True)
    labels = torch.randint(0, 500, (1, 65))
    labels[0, 17:49] = -100  # targets 16..47: the second and third chunks of 16 predict nothing
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    live = []

    def pack(t):
        live.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n = causal_lm_loss_sum(head, hidden, labels, chunk=16)
    kept = sum(r().numel() for r in live if r() is not None and r().numel() >= 500)
    assert kept == 0
    loss.backward()
    assert len(calls) == 2 and n == 64 - 32
    assert hidden.grad[0, 16:48].abs().max() == 0 and hidden.grad[0, :16].abs().max() > 0
    want = _reference(head, hidden.detach().requires_grad_(True), labels)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab,chunk", [(500, 1024), (2**17, 512), (2**18, 256)])
def test_the_default_chunk_shrinks_with_the_vocabulary_as_the_estimate_counts_it(vocab, chunk):
    """Without ``chunk`` the loss takes ``loss_chunk_tokens`` of the head's vocabulary (1,024 tokens,
    halved while a chunk would hold more than 2**26 logits) — the chunk the memory estimate counts."""
    from tinytune.memory.estimate import ModelShape, Setup, loss_chunk, loss_chunk_tokens

    assert loss_chunk_tokens(vocab) == chunk
    assert [loss_chunk_tokens(v) for v in (32000, 128256, 151936, 256000)] == [1024, 512, 256, 256]
    head = torch.nn.Linear(4, vocab, bias=False).requires_grad_(False)
    rows = []
    head.register_forward_hook(lambda _m, args, _out: rows.append(args[0].shape[0]))
    hidden = torch.randn(1, 1101, 4, requires_grad=True)
    labels = torch.randint(0, vocab, (1, 1101))
    causal_lm_loss_sum(head, hidden, labels)
    assert rows == [chunk] * (1100 // chunk) + ([1100 % chunk] if 1100 % chunk else [])
    shape = ModelShape("m", "llama", 1, 4, 8, 1, 1, 4, vocab, False, 2048)
    assert loss_chunk(shape, Setup(seq_len=1101)) == chunk


def test_without_gradients_the_loss_is_the_same_and_nothing_is_recorded():
    torch.manual_seed(3)
    head = torch.nn.Linear(16, 100, bias=False)
    hidden = torch.randn(2, 30, 16, requires_grad=True)
    labels = torch.randint(0, 100, (2, 30))
    with torch.no_grad():
        got, n = causal_lm_loss_sum(head, hidden, labels, chunk=7)
    assert got.grad_fn is None and n == 58
    torch.testing.assert_close(got, _reference(head, hidden, labels), rtol=1e-5, atol=1e-5)
    empty, none = causal_lm_loss_sum(head, hidden[:, :1], labels[:, :1], chunk=0)
    assert none == 0 and float(empty) == 0.0


def test_a_second_backward_through_the_same_loss_says_why_it_cannot():
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(1, 10, 8, requires_grad=True)
    loss, _ = causal_lm_loss_sum(head, hidden, torch.randint(0, 50, (1, 10)), chunk=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


def test_bench_loss_runs_on_the_cpu_and_agrees_with_the_full_loss():
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parent.parent / "tools" / "bench_loss.py"
    out = subprocess.run([sys.executable, str(tool), "--model", "smollm2-135m", "--tokens", "64", "--chunk", "16",
                          "--repeats", "1", "--train-head"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[2:]}
    assert set(rows) == {"full", "checkpointed", "tinytune"}
    assert all(float(row[-1]) < 1e-2 for row in rows.values())  # loss sum and gradients vs full logits
