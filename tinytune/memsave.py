"""Memory switches, each exact (the same gradients, recomputed or moved):

- **Embeddings in host memory.** A frozen, untied input embedding is only looked up: its table
  (1 GiB for Llama-3.1-8B's 128,256 × 4,096 in bf16) stays in host memory and only the looked-up
  rows (tokens × hidden) travel to the GPU. ``embeddings_on_host`` swaps in a module that holds the
  table as a plain attribute, so the model's parameters (and ``model.device``) stay on the GPU.

- **Gradient checkpointing**, reentrant: a checkpointed layer's first forward runs without grad,
  keeping only its input (through ``save_for_backward``), and backward runs it again with grad.
  The non-reentrant kind runs the first forward with grad and drops each tensor autograd saves
  through a saved-tensor hook of its own: a Python call per saved tensor (86 per compiled decoder
  layer, whose partition saves many small tensors), another for each in the recomputation, and a
  comparison of the recomputed tensors' metadata with the first ones'. On the CPU proxy of an 8B
  step's host work (``tools/bench_overhead.py``: 32 layers at width 64, compiled, every layer
  checkpointed) a step takes 226 ms with the reentrant kind against 279 ms, the recipe's 394 ms
  (reentrant too, eager). Reentrant checkpointing needs an input that requires grad: the
  embeddings' output is made to (``enable_input_require_grads``).
- **Offloaded checkpoints.** With gradient checkpointing a step keeps one tensor per decoder layer,
  its input (tokens × hidden). ``offload_checkpoints`` moves those to (pinned) host memory until
  the layer's backward needs them, so GPU activations no longer grow with the number of layers:
  what reentrant checkpointing keeps through ``save_for_backward`` saved-tensor hooks
  (``HostCopies``) can move. On CUDA the copies run on a
  stream of their own, so neither direction stalls the computation: in forward the copy to host
  overlaps the next layers (the CPU waits only once it is ``COPIES_IN_FLIGHT`` copies ahead, since
  each holds a layer input on the GPU until done); in backward, when a layer takes its input back,
  the input of the layer before it (the next one backward needs) starts coming back, and the CPU
  waits first until the GPU has begun the layer handed out before this one: each fetch allocates a
  layer input, so a CPU running ahead of the GPU (long sequences: a layer's GPU work far outlasts its
  launches) would otherwise bring back the inputs of as many layers as it is ahead — 256 MiB each
  for Llama-3.1-8B at 32,768 tokens. Three layer inputs are on the GPU at most: the one the GPU is
  finishing, the one taken back, the one coming.
- **Plain last layers.** Checkpointing costs a second forward of each layer. Where memory is left
  over, ``plain_last_layers`` leaves the last layers out: they keep their activations and run once.
- **Tiled MLP.** A layer recomputed in backward rebuilds its MLP's intermediates (gate, up and
  their product: 3 × tokens × intermediate, 14,336 wide for Llama-3.1-8B) for the whole sequence at
  once, and so does the layer's first forward, which checkpointing runs without grad. ``tile_mlp``
  runs the MLP over the sequence in tiles, each under its own checkpoint (plainly where grad is
  off), so only one tile's intermediates exist at a time. The MLP is position-wise, so tiling
  changes nothing but the order of float additions in the weight gradients.
- **Freed host memory returned** (CPU runs). glibc's malloc raises its mmap threshold each time it
  frees a large block (up to 32 MiB), after which blocks below it come from the heap and stay with
  the process when freed: on a CPU the step's activations are such blocks, and a SmolLM2-135M step
  at 2,048 tokens grew the process by 6.58 GiB where its tensors needed about 3 (the estimate: 2.40
  for the layers). ``return_freed_host_memory`` fixes the threshold at ``HOST_MMAP_THRESHOLD``, so
  every tensor above it goes back to the system when freed: 3.24 GiB, the step 3% slower (within
  its noise; a 64 KiB threshold: 3.00 GiB, 8% slower).
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import functools
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from tinytune.loading import decoder_layers
from tinytune.memory.estimate import host_embeddings_apply


class HostEmbedding(torch.nn.Module):
    """A frozen embedding table in host memory; lookups run there, the rows go to ``device``."""

    def __init__(self, embedding: torch.nn.Embedding, device: torch.device) -> None:
        super().__init__()
        self.table = embedding.weight.detach().to("cpu")  # not a parameter: nothing trains it
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = self.table.shape
        self.device = device

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = torch.nn.functional.embedding(input_ids.to("cpu"), self.table, self.padding_idx)
        return rows.to(self.device, non_blocking=False)


def embeddings_on_host(model, technique: str) -> bool:
    """Move the input embedding table to host memory where ``host_embeddings_apply``; True if moved."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    if not isinstance(emb, torch.nn.Embedding) or not host_embeddings_apply(tied, technique, emb.weight.device.type):
        return False
    model.set_input_embeddings(HostEmbedding(emb, emb.weight.device))
    return True


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in backward, with reentrant checkpointing (see the module doc).

    Reentrant checkpointing needs an input that requires grad: enabling checkpointing makes
    transformers hook the input embeddings so their output does (``enable_input_require_grads``), one
    more hook on every call, so the hook of an earlier call (calibration's, then the run's) goes first."""
    model.disable_input_require_grads()
    kwargs = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


COPIES_IN_FLIGHT = 2
"""Copies to host the CPU may queue ahead of the GPU. Each holds its source (a layer's input) on the
GPU until it is done, though the allocator no longer counts it: left alone, the CPU queues layers
as far ahead as the launch queue lets it, each holding a layer input the memory budget never saw."""


FETCHES_AHEAD = 1
"""In backward: layer inputs handed to the GPU that it may not have begun when the CPU fetches the
next one (see the module doc)."""


class _Saved:
    """One offloaded tensor: its host copy, its way back once fetched, and the one saved before it."""

    __slots__ = ("device", "before", "host", "fetched", "arrived", "__weakref__")

    def __init__(self, device: torch.device, before: weakref.ref[_Saved] | None) -> None:
        self.device, self.before, self.host, self.fetched, self.arrived = device, before, None, None, None


class HostCopies:
    """Saved-tensor hooks that keep what autograd saves in host memory (pinned, on CUDA).

    On CUDA every copy runs on a side stream, ordered against the computation by events alone:
    the CPU never waits for a copy, and the computation waits only where it reads a fetched input.
    Each saved tensor knows (weakly) the one saved before it; taking one back starts fetching that
    one, which backward (running the layers in reverse) needs next. A step that is abandoned (out
    of memory mid-forward) frees its copies with its autograd graph. The CPU waits only where more
    than ``COPIES_IN_FLIGHT`` copies to host are still to finish."""

    def __init__(self, device: torch.device) -> None:
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.last: weakref.ref[_Saved] | None = None  # the latest saved
        self.copying: collections.deque[torch.cuda.Event] = collections.deque()  # copies to host, oldest first
        self.handed: collections.deque[torch.cuda.Event] = collections.deque()  # backward: inputs handed out, oldest first

    def pack(self, t: torch.Tensor) -> _Saved:
        saved = _Saved(t.device, self.last)
        if self.side is None or t.device.type != "cuda":
            saved.host = t.detach().to("cpu", copy=True)
        else:
            self.side.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.side):
                saved.host = torch.empty_like(t, device="cpu", pin_memory=True)
                saved.host.copy_(t, non_blocking=True)  # fetched later on this stream, so after this copy
                self.copying.append(self.side.record_event())
            t.record_stream(self.side)  # the allocator keeps t's memory until the copy has read it
            while len(self.copying) > COPIES_IN_FLIGHT:
                self.copying.popleft().synchronize()
        self.last = weakref.ref(saved)
        return saved

    def _fetch(self, saved: _Saved) -> None:
        if saved.host.device == saved.device:
            saved.fetched = saved.host
        elif self.side is None:
            saved.fetched = saved.host.to(saved.device)
        else:
            with torch.cuda.stream(self.side):
                saved.fetched = saved.host.to(saved.device, non_blocking=True)
                saved.arrived = self.side.record_event()

    def unpack(self, saved: _Saved) -> torch.Tensor:
        if saved.fetched is None:
            self._fetch(saved)
        if saved.arrived is not None:
            current = torch.cuda.current_stream(saved.device)
            current.wait_event(saved.arrived)
            saved.fetched.record_stream(current)  # allocated on the side stream, read on this one
            self.handed.append(current.record_event())
            while len(self.handed) > FETCHES_AHEAD:
                self.handed.popleft().synchronize()
        previous = saved.before() if saved.before is not None else None
        if previous is not None and previous.fetched is None:
            self._fetch(previous)
        return saved.fetched


def _offloaded(function, *args, copies: HostCopies):
    with torch.autograd.graph.saved_tensors_hooks(copies.pack, copies.unpack):
        return checkpoint(function, *args, use_reentrant=True)


def offload_checkpoints(model) -> None:
    """Checkpoint every decoder layer with its input kept in host memory (pinned on CUDA)."""
    copies = HostCopies(next(model.parameters()).device)
    enable_checkpointing(model)
    for layer in decoder_layers(model):
        layer._gradient_checkpointing_func = functools.partial(_offloaded, copies=copies)


def checkpoint_layers(model, offload: bool = False, plain_layers: int = 0) -> None:
    """Gradient checkpointing as a plan sets it: inputs offloaded or not, the last layers plain."""
    offload_checkpoints(model) if offload else enable_checkpointing(model)
    plain_last_layers(model, plain_layers)


def plain_last_layers(model, n: int) -> None:
    """After checkpointing is on: run the last ``n`` decoder layers without it (0 = checkpoint all).

    The last layers are the ones to leave plain: their backward runs first, so their activations
    are gone before any checkpointed layer is rebuilt, and the last layer's recomputation would
    come right after its forward anyway."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < len(layers) - n


def _tiled(mlp_forward, tiles: int, x: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, hidden) → (batch, seq, hidden), the sequence in ``tiles`` pieces.

    Without grad too: a checkpointed layer's first forward runs without it, and over the whole
    sequence its MLP would hold several tokens × intermediate tensors at once (the projections'
    outputs, the adapters' branches, their sums), more than backward needs for a tile."""
    if x.dim() < 3 or x.shape[-2] < 2 * tiles:
        return mlp_forward(x)
    run = functools.partial(checkpoint, mlp_forward, use_reentrant=False) if torch.is_grad_enabled() else mlp_forward
    return torch.cat([run(piece) for piece in x.chunk(tiles, dim=-2)], dim=-2)


def tile_mlp(model, tiles: int) -> None:
    """Run every decoder layer's MLP over the sequence in ``tiles`` checkpointed pieces."""
    if tiles <= 1:
        return
    for layer in decoder_layers(model):
        mlp = layer.mlp
        mlp.forward = functools.partial(_tiled, mlp.forward, tiles)


HOST_MMAP_THRESHOLD = 4 * 2**20
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_freed_host_memory() -> bool:
    """Fix glibc's mmap threshold at ``HOST_MMAP_THRESHOLD`` (see the module doc); False where the C
    library has no ``mallopt`` (not glibc) or refuses."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return mallopt(M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD) == 1
