"""The random-weight models and rows of benchmarks/scale.py: Llama shapes built from config (fp32, bf16,
or NF4 quantized Linear by Linear on the meta device), a word-level tokenizer covering a vocabulary and
random rows of its words."""

from __future__ import annotations

import json
import random
from pathlib import Path

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "135m": (576, 1536, 30, 9, 3, 49152),
    "medium": (1024, 2816, 8, 16, 4, 32000),  # fsdp_profile.py's quick shape (0.58 GiB fp32)
    "1b": (2048, 5632, 22, 32, 4, 32000),
    "7b": (4096, 11008, 32, 32, 32, 32000),
}
GIB = 1024**3


def llama_config(size: str):
    from transformers import LlamaConfig

    h, i, n, a, kv, v = SHAPES[size]
    return LlamaConfig(
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=n,
        num_attention_heads=a,
        num_key_value_heads=kv,
        vocab_size=v,
        max_position_embeddings=2048,
        tie_word_embeddings=size == "135m",
    )


def build(size: str, base: str):
    """A random-weight Llama of `size`: fp32, bf16, or NF4 quantized Linear by Linear from meta (the
    rest in bf16, as `from_pretrained(dtype=bfloat16)` of a bf16 checkpoint gives it)."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(size)
    if base in ("fp32", "bf16"):
        return LlamaForCausalLM._from_config(
            config, dtype=torch.float32 if base == "fp32" else torch.bfloat16
        ).eval()
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from lorachain.config import ModelConfig
    from lorachain.training.quantization import quantize_model

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    mcfg = ModelConfig(name_or_path="random", quantization="nf4", compute_dtype="bfloat16")
    quantize_model(model, mcfg, init=lambda lin: torch.randn(lin.out_features, lin.in_features) * 0.02)
    for module in model.modules():  # the rest (embeddings, norms, head) in bf16, as a bf16 checkpoint
        for name, p in list(module.named_parameters(recurse=False)):  # loads; prepare upcasts the norms
            if p.is_meta:
                new = torch.empty(p.shape, dtype=torch.bfloat16)
                new = new.fill_(1.0) if "norm" in type(module).__name__.lower() else new.normal_(0, 0.02)
                setattr(module, name, torch.nn.Parameter(new, requires_grad=False))
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def word_tokenizer(vocab: int):
    """A word-level tokenizer whose ids cover the whole vocabulary: [PAD], [EOS], [UNK], w3, w4, ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[EOS]", "[UNK]"] + [f"w{i}" for i in range(3, vocab)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def random_rows(path: Path, n: int, length: int, vocab: int) -> Path:
    rng = random.Random(0)
    rows = [{"text": " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(length))} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
