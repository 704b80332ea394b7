"""Speed switches that change no result: compiled decoder layers.

A quantized 8B model at batch 1 and 2,048 tokens is bound by the CPU, not the GPU: each decoder
layer runs some 70 small operations per pass (dequantize, matmul, the adapter's branch, casts,
norms), each launched from Python, and the GPU waits between them (measured on an H100: 300 ms of
GPU work in a 720 ms step). ``compile_layers`` compiles each decoder layer's forward with
``torch.compile``: the elementwise work around the matmuls is fused into a few generated kernels
and the launches come from compiled code.

The compiled region is the layer's own forward (norms, attention, MLP, the adapters in them and a
tiled MLP's pieces), entered once per pass. Compiling the parts instead (attention, MLP, each norm)
enters four regions per layer and pass, and each entry costs the CPU its guard checks and the
runtime wrapper around the compiled graph. Measured with the 8B shape's 32 layers at width 64 on one
CPU thread (128 tokens, every layer checkpointed), where little but this overhead is left: 354 ms per
step with compiled parts, 317 ms with compiled layers, the recipe's eager step 385 ms (checkpointing
was non-reentrant then; reentrant since, compiled layers take 226 ms: ``tinytune.memsave``). The
compiler's partition of a whole layer also keeps less for backward (a plain layer 256 wide, LoRA
r16, dropout 0.05: 16.3 KB per token, against 18.4 with parts and 23.8 eager).

Checkpointing and offloading stay outside the compiled code: transformers wraps a layer's forward in
its checkpointing call, and the compiled forward is the one inside that wrapper, so recomputation
reruns it. (Compiling the wrapper too lets the compiler trace non-reentrant checkpointing and do the
recomputation inside its own backward: 259 ms in the 317 ms measurement above, but what it keeps is then
the partitioner's choice, which the estimator does not model, and the offloaded form, reentrant
under saved-tensor hooks, is not compiled at all.) All layers share one compiled graph per grad mode:
their code is the same, and parameters are graph inputs.

Only training runs compiled code: in eval mode (evaluation, the sample) a layer runs its eager
forward. Those calls come without grad, without a mask or with a KV cache, each a graph of its own;
compiled too, a short CPU run with a sample made 8 graphs of the layer forward, the compiler's
recompile limit, past which any new case (such as a training step's) runs eager without a word.
Training can make more than 8 where its micro-batches differ: with and without grad (reentrant
checkpointing runs the first forward without it), at the first shape, then with lengths made
dynamic, then the batch size (a batch of one is a case of its own). Training batches carry no
attention mask (right-padded ones need none: ``data.collate``; packed rows and windowed layers get
tinytune's attention, which runs outside the compiled code: a graph break in each layer). A run whose
micro-batches of 2 and 4 are sometimes padded and one is a single example makes 8 (14 when padded
batches carried a mask). ``compile_layers`` raises the limit to ``RECOMPILE_LIMIT``; each graph
costs compile time once.

A 4-bit layer inside a compiled layer runs as tensor operations (``quant.traceable_4bit``), not
through bitsandbytes' registered operators: its dequantization becomes one generated kernel, with no
call into Python. On CUDA at 2,048 tokens bitsandbytes makes one such call per forward of a 4-bit
layer and two per backward: 896 per step for the 8B's 224 layers, every one checkpointed. One 64×64
layer compiled on one CPU thread (128 tokens): 676 µs per forward and backward through
bitsandbytes' operators, 510 µs as tensor operations; the 32-layer proxy above, 258 against 226 ms
per step (with non-reentrant checkpointing it was 285 against 279, within its noise).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from tinytune import quant
from tinytune.loading import decoder_layers


def can_compile(device: torch.device) -> bool:
    """On CUDA with Triton present: where compiled layers pay off and build without a C++ toolchain."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


RECOMPILE_LIMIT = 64
"""Graphs of the layer forward the compiler may make (its default, 8, is too few: see the module doc)."""


def compile_layers(model, backend: str = "inductor", traced_4bit: bool = True) -> None:
    """Compile every decoder layer in place; errors inside the compiler fall back to eager.
    ``traced_4bit=False`` keeps bitsandbytes' operators for 4-bit layers (to measure the difference)."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for layer in decoder_layers(model):
        if traced_4bit:
            quant.traceable_4bit(layer)
        layer.__class__ = _compiled_class(type(layer), backend)


@functools.cache
def _compiled_class(cls: type, backend: str) -> type:
    """``cls`` with its own forward compiled. transformers wraps a decoder layer's forward in the
    checkpointing call (``GradientCheckpointingLayer``); the subclass compiles the forward inside
    that wrapper (``__wrapped__``) and is wrapped alike, so checkpointing and offloading stay
    outside the compiled code and recomputation reruns it."""
    forward = getattr(cls.forward, "__wrapped__", cls.forward)
    compiled = torch.compile(forward, backend=backend)

    @functools.wraps(forward)  # the signature stays the layer's; compiling again finds the eager one
    def train_compiled(self, *args, **kwargs):
        return (compiled if self.training else forward)(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"forward": train_compiled,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})
