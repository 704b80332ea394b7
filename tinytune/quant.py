"""The one place that knows bitsandbytes' quantized layers.

Techniques never look inside a quantized layer: they call the base module for the forward pass and
``dequantized_weight`` when they merge. Quantization happens one ``nn.Linear`` at a time, so the
16-bit weights of a whole model never sit on the GPU together.

- 4-bit: NF4 with double quantization (QLoRA, arXiv 2305.14314): 4 bits per weight plus one fp8
  absmax per 64 weights and one fp32 per 256 absmax blocks ≈ 4.127 bits/param.
- 8-bit: LLM.int8 (arXiv 2208.07339): int8 rows with one fp32 scale per row; input columns with
  outliers above 6.0 run in 16-bit. bitsandbytes' own autograd function keeps its input (and the
  outlier columns) as attributes of its context object, where no saved-tensor hook sees them, so
  non-reentrant gradient checkpointing cannot free them: every layer's inputs stay alive until
  backward (Llama-3.1-8B shape at 1,024 tokens on an H100: 14.91 GiB against 10.46 without). Frozen
  int8 layers here run bitsandbytes' forward without autograd and compute the input's gradient from
  the int8 weight (``FrozenInt8``): nothing is kept, however the layer is checkpointed.

Compiled layers (``tinytune.fast``) run a 4-bit layer as tensor operations instead
(``traceable_4bit``): the dequantization the compiler can fuse into one generated kernel, then the
matmul, with the weight dequantized again for backward rather than kept.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.utils.checkpoint
from torch import nn

NF4_BITS_PER_PARAM = 4 + 8 / 64 + 32 / (64 * 256)


# bitsandbytes' CPU backend looks for an optional bf16 inference kernel on import and, on a CPU with
# AVX512-BF16, warns that it is missing; that path is turned off here (see quantize_linear).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# LLM.int8 quantizes every input through fp16 by design, and bitsandbytes logs a warning saying so
# on every 8-bit matmul of a bf16 or fp32 input: thousands of lines a run. Only that one is dropped.
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: not str(record.msg).startswith("MatMul8bitLt: inputs will be cast"))


def load_bnb():
    import bitsandbytes as bnb  # imported late: it prints diagnostics on import

    return bnb


def quantize_linear(linear: nn.Linear, bits: int, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """Return a bitsandbytes replacement for ``linear`` living on ``device`` (quantized there)."""
    bnb = load_bnb()
    weight = linear.weight.data
    bias = linear.bias.data if linear.bias is not None else None
    if bits == 4:
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=bias is not None,
            compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4", device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            weight.to("cpu"), requires_grad=False, compress_statistics=True, quant_type="nf4",
        )
        # On a CPU with AVX512-BF16, bitsandbytes repacks the weight the first time the layer runs in
        # eval mode without grad, for a bf16 kernel that has no backward; training after an eval
        # would then run that kernel, and the layer's input would get no gradient. Keep the layout.
        q.support_avx512bf16_for_cpu = False
    elif bits == 8:
        q = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias=bias is not None,
            has_fp16_weights=False, threshold=6.0, device="meta",
        )
        q.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
    else:
        raise ValueError(f"cannot quantize to {bits} bits")
    if bias is not None:
        q.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
    q = q.to(device)  # bitsandbytes quantizes on this move
    if bits == 8:
        q.forward = functools.partial(FrozenInt8.apply_to, q, q.forward)
    return q


class FrozenInt8(torch.autograd.Function):
    """A frozen LLM.int8 layer: bitsandbytes' forward, the input's gradient from the int8 weight.

    The backward is bitsandbytes' own for a frozen weight (grad_output @ dequantized weight); only the
    module is kept for it, no activation.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module, bnb_forward) -> torch.Tensor:
        ctx.module, ctx.x_dtype = module, x.dtype
        with torch.no_grad():
            return bnb_forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        w = int8_weight(ctx.module, grad.dtype)
        return (grad @ w).to(ctx.x_dtype), None, None

    @staticmethod
    def apply_to(module: nn.Module, bnb_forward, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return bnb_forward(x)
        return FrozenInt8.apply(x, module, bnb_forward)


def int8_weight(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The int8 layer's weight dequantized to ``dtype`` (out × in)."""
    w = module.weight
    cb = module.state.CB if getattr(module.state, "CB", None) is not None else w.data
    scb = module.state.SCB if getattr(module.state, "SCB", None) is not None else w.SCB
    return cb.to(dtype) * (scb.to(dtype)[:, None] / 127.0)


def is_quantized(module: nn.Module) -> bool:
    bnb = load_bnb()
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def quantized_bits(module: nn.Module) -> int | None:
    bnb = load_bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        return 4
    if isinstance(module, bnb.nn.Linear8bitLt):
        return 8
    return None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer really multiplies by, as fp32 (out_features × in_features).

    For a quantized layer this is the dequantized value — the weight an adapter was trained against —
    not the original 16-bit weight, so merging into it reproduces the adapter model's outputs.
    """
    bnb = load_bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        w = module.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if isinstance(module, bnb.nn.Linear8bitLt):
        return int8_weight(module, torch.float32)
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a plain or quantized linear layer."""
    return module.in_features, module.out_features


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_quantized(module)


class Traceable4bit:
    """A 4-bit layer's forward as tensor operations when compiled (``traceable_4bit``).

    Compiled code calls bitsandbytes' registered operators as opaque calls into Python: on CUDA one
    per forward of a 4-bit layer (dequantize the 8-bit absmax, add its offset, dequantize the weight,
    multiply, inside) and two per backward, 896 per step for the 8B's 224 layers, all checkpointed.
    Written as tensor operations, the compiler fuses the whole dequantization into one kernel
    launched from its own code. The arithmetic is bitsandbytes': a 4-bit code's value times its
    block's absmax in fp32, rounded once to the compute dtype (bit for bit on the CPU, tested; the GPU
    compiler may fuse the absmax's multiply and add into one rounding). The dequantization sits in a
    checkpoint, so the compiler's partitioner computes the weight again for backward rather than
    keeping it, as bitsandbytes keeps nothing either. Outside compiled code (a graph the compiler gave
    up on) it is bitsandbytes' forward.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.weight.quant_state
        if not torch.compiler.is_compiling() or state.quant_type != "nf4" or math.prod(state.shape) % state.blocksize:
            return super().forward(x)
        dtype = self.compute_dtype or x.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        w = torch.utils.checkpoint.checkpoint(nf4_dequantize, *nf4_parts(self.weight), dtype, use_reentrant=False)
        return torch.nn.functional.linear(x.to(dtype), w, bias).to(x.dtype)


def traceable_4bit(module: nn.Module) -> int:
    """Run every 4-bit layer under ``module`` as tensor operations (``Traceable4bit``); returns how many."""
    bnb = load_bnb()
    n = 0
    for m in module.modules():
        if isinstance(m, bnb.nn.Linear4bit) and not isinstance(m, Traceable4bit):
            m.__class__ = _traceable_class(type(m))
            n += 1
    return n


@functools.cache
def _traceable_class(cls: type) -> type:
    return type(cls.__name__, (Traceable4bit, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def nf4_parts(weight) -> tuple:
    """A 4-bit weight's tensors and sizes, as ``nf4_dequantize`` takes them (all but the dtype)."""
    state = weight.quant_state
    nested = (state.state2.code, state.state2.absmax, state.state2.blocksize, state.offset) if state.nested else (None,) * 4
    return (weight.data, state.code, state.absmax, state.blocksize, tuple(state.shape), *nested)


def nf4_dequantize(packed, code, absmax, blocksize, shape, code2, absmax2, blocksize2, offset, dtype) -> torch.Tensor:
    """bitsandbytes' NF4 weight in ``dtype``, as tensor operations. ``packed`` holds two codes per
    byte, the first in the high half. With double quantization ``absmax`` is itself 8-bit blockwise
    (``code2``, ``absmax2`` per ``blocksize2`` blocks, plus ``offset``); else ``code2`` is None.

    The outer scales are spread by expanding ``absmax2``, not by indexing it with an ``arange``: such
    an index is the same tensor for every layer of one size, and compiled code that shares it fuses
    those layers' dequantizations into one kernel, which holds all their weights at once (seen for the
    MLP's three in backward)."""
    if code2 is not None:
        outer = absmax2.view(-1, 1).expand(-1, blocksize2).reshape(-1)[:absmax.numel()]
        absmax = code2[absmax.long()] * outer + offset
    q = packed.view(torch.uint8).reshape(-1, 1)
    codes = (q >> torch.tensor([4, 0], dtype=torch.uint8, device=q.device)) & 0xF
    return (code[codes.long()].view(-1, blocksize) * absmax.view(-1, 1)).view(shape).to(dtype)
