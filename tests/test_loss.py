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
