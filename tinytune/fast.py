"""Speed switches that change no result: compiled decoder layers.

A quantized 8B model at batch 1 and 2,048 tokens is bound by the CPU, not the GPU: each decoder
layer runs some 70 small operations per pass (dequantize, matmul, the adapter's branch, casts,
norms), each launched from Python, and the GPU waits between them (measured on an H100: 300 ms of
GPU work in a 720 ms step). ``compile_layers`` compiles each decoder layer's forward with
``torch.compile``: the elementwise work around the matmuls is fused into a few generated kernels
and the launches come from compiled code. What is compiled are the layer's parts (attention, MLP,
norms), not the layer: checkpointing (which transformers may apply inside the layer's forward),
offloading and MLP tiles stay outside the compiled code, so they work unchanged around it and
recomputation reruns the compiled parts. All layers share each part's compiled graph (their code is
the same; parameters are graph inputs).
"""

from __future__ import annotations

import importlib.util

import torch

from tinytune.loading import decoder_layers


def can_compile(device: torch.device) -> bool:
    """On CUDA with Triton present: where compiled layers pay off and build without a C++ toolchain."""
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def compile_layers(model, backend: str = "inductor") -> None:
    """Compile the parts of every decoder layer in place; errors inside the compiler fall back to eager."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True
    layers = decoder_layers(model)
    for layer in layers:
        for part in layer.children():
            part.compile(backend=backend)
