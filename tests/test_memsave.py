"""Offloaded checkpoints and the tiled MLP compute the same gradients as plain training."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch

from tinytune import adapters, fast, loading, memsave, train
from tinytune.config import TrainConfig

IDS = torch.randint(3, 2000, (2, 48), generator=torch.Generator().manual_seed(0))
TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _nonzero_adapters(model) -> None:
    with torch.no_grad():  # B starts at zero: give it values so every path carries gradient
        for p in adapters.trainable(model):
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(p.numel()))


def _padded_batch() -> dict[str, torch.Tensor]:
    mask = torch.ones_like(IDS)
    mask[1, 30:] = 0  # a padded row
    return {"input_ids": IDS, "attention_mask": mask, "labels": IDS.masked_fill(mask == 0, -100)}


def lora_grads(tiny_model_dir, bits: int, setup, dropout: float = 0.0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = loading.load_model(loading.resolve_source(str(tiny_model_dir)), bits, torch.device("cpu"))
    cfg = TrainConfig(rank=4, alpha=8, dropout=dropout, bits=bits)
    adapters.apply(model, cfg)
    _nonzero_adapters(model)
    setup(model)
    model.train()
    loss_sum, n = train.forward_loss(model, _padded_batch(), torch.device("cpu"), torch.float32)
    (loss_sum / n).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


SETUPS = {
    "checkpointing": memsave.enable_checkpointing,
    "offloaded checkpoints": memsave.offload_checkpoints,
    "tiled MLP": lambda m: (memsave.enable_checkpointing(m), memsave.tile_mlp(m, 3)),
    "offloaded + tiled": lambda m: (memsave.offload_checkpoints(m), memsave.tile_mlp(m, 4)),
    "tiled MLP without checkpointing": lambda m: memsave.tile_mlp(m, 3),
    "checkpointing, last layer plain": lambda m: (memsave.enable_checkpointing(m), memsave.plain_last_layers(m, 1)),
    "offloaded, last layer plain": lambda m: (memsave.offload_checkpoints(m), memsave.plain_last_layers(m, 1)),
    # the compiler's graph capture and autograd split, without code generation (CPU, fast)
    "compiled layers": lambda m: (memsave.enable_checkpointing(m), fast.compile_layers(m, backend="aot_eager")),
    "compiled + offloaded + tiled": lambda m: (memsave.offload_checkpoints(m), memsave.tile_mlp(m, 3),
                                               fast.compile_layers(m, backend="aot_eager")),
}


@pytest.mark.parametrize("bits", [4, 16])
@pytest.mark.parametrize("name", list(SETUPS))
def test_same_gradients_as_plain(tiny_model_dir, bits, name):
    plain = lora_grads(tiny_model_dir, bits, lambda m: None)
    other = lora_grads(tiny_model_dir, bits, SETUPS[name])
    assert plain.keys() == other.keys() and len(plain) == 2 * 14
    for key in plain:
        assert plain[key].abs().sum() > 0, key
        torch.testing.assert_close(other[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)


TILED = {"tiled MLP": 3, "offloaded + tiled": 4}


@pytest.mark.parametrize("name", ["checkpointing", "offloaded checkpoints", "compiled layers", *TILED])
def test_recomputed_layers_draw_the_same_dropout_masks(tiny_model_dir, name):
    """LoRA's dropout draws its mask from the CPU generator in forward and again in backward; a
    recomputed layer (the generator restored by checkpointing) must draw the same ones as its first
    forward did. A tiled MLP draws per tile (a different, equally valid mask than the whole
    sequence's), in the first forward as in the recomputation: its reference is tiled alike, without
    checkpointing. Compiled layers draw the index hash's masks: their reference is compiled too."""
    compiled = "compiled" in name
    reference = ((lambda m: fast.compile_layers(m, backend="aot_eager")) if compiled
                 else (lambda m: memsave.tile_mlp(m, TILED[name])) if name in TILED else lambda m: None)
    plain = lora_grads(tiny_model_dir, 4, reference, dropout=0.2)
    other = lora_grads(tiny_model_dir, 4, SETUPS[name], dropout=0.2)
    no_dropout = lora_grads(tiny_model_dir, 4, lambda m: None)
    assert any(not torch.allclose(plain[k], no_dropout[k]) for k in plain)  # dropout is really on
    for key in plain:
        torch.testing.assert_close(other[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)
    torch._dynamo.reset()


@pytest.mark.parametrize("offload", [False, True])
def test_tiled_mlp_never_builds_an_intermediate_for_the_whole_sequence(tiny_model_dir, offload):
    """Every tensor as wide as the MLP's intermediate, in forward (which offloading's reentrant
    checkpointing runs without grad) and in backward, covers one tile of the sequence at most."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widths(TorchDispatchMode):
        """The sequence length of every new (batch, seq, width) tensor an operation makes."""

        def __init__(self, width: int) -> None:
            super().__init__()
            self.width, self.lengths = width, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(a, torch.Tensor)}
            for t in torch.utils._pytree.tree_leaves(out):
                if (isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[-1] == self.width
                        and t.untyped_storage().data_ptr() not in inputs):  # views make nothing new
                    self.lengths.append(t.shape[-2])
            return out

    torch.manual_seed(0)
    model = loading.load_model(loading.resolve_source(str(tiny_model_dir)), 4, torch.device("cpu"))
    adapters.apply(model, TrainConfig(rank=4, alpha=8, dropout=0.1, bits=4))
    memsave.offload_checkpoints(model) if offload else memsave.enable_checkpointing(model)
    memsave.tile_mlp(model, 4)
    model.train()
    batch = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": IDS}
    forward, backward = Widths(model.config.intermediate_size), Widths(model.config.intermediate_size)
    with forward:
        loss_sum, n = train.forward_loss(model, batch, torch.device("cpu"), torch.float32)
    with backward:
        (loss_sum / n).backward()
    tile = IDS.shape[1] // 4
    assert max(forward.lengths) == tile and max(backward.lengths) == tile


def test_compiled_layers_are_captured_without_graph_breaks(tiny_model_dir):
    """Checkpointing and offloading stay outside the compiled layer; the tiled MLP's pieces and LoRA's
    dropout (its seed, index hash and checkpointed masking) are traced: nothing breaks a graph."""
    from torch._dynamo.utils import counters

    counters.clear()
    torch._dynamo.reset()
    lora_grads(tiny_model_dir, 4, SETUPS["compiled + offloaded + tiled"], dropout=0.1)  # dropout: traced, no graph break
    assert counters["stats"]["unique_graphs"] >= 2 and counters["frames"]["ok"] == counters["frames"]["total"]
    assert not counters["graph_break"], list(counters["graph_break"])
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["compiled layers", "compiled + offloaded + tiled"])
def test_a_compiled_layer_is_entered_once_per_pass(tiny_model_dir, name):
    """Each entry into compiled code costs the CPU guard checks and a runtime wrapper: a checkpointed
    layer enters it once in forward and once when backward recomputes it, nothing more."""
    from torch.profiler import profile

    torch._dynamo.reset()
    lora_grads(tiny_model_dir, 4, SETUPS[name])  # compiles
    with profile() as prof:
        lora_grads(tiny_model_dir, 4, SETUPS[name])
    entries = [e for e in prof.events() if e.name.startswith("Torch-Compiled Region")]
    layers = json.loads((Path(tiny_model_dir) / "config.json").read_text())["num_hidden_layers"]
    assert len(entries) == 2 * layers
    torch._dynamo.reset()
