"""Tiny random models and toy data built in-process: no downloads, no network."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    BloomConfig,
    BloomForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

POS = ["good", "great", "fine", "lovely", "superb", "nice"]
NEG = ["bad", "awful", "poor", "dull", "boring", "ugly"]
FILL = ["the", "film", "was", "plot", "very", "acting", "and", "movie", "story", "quite"]
WORDS = [
    "[PAD]",
    "[UNK]",
    "[BOS]",
    "[EOS]",
    "Review",
    ":",
    "Sentiment",
    "positive",
    "negative",
    *POS,
    *NEG,
    *FILL,
]


ROUTE_WORDS = [
    "alpha",
    "beta",
    "gamma",
    "red",
    "blue",
    "green",
    "one",
    "two",
    "three",
    "=>",
    "task:",
    "sky",
    "sea",
    "leaf",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS + ROUTE_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]", bos_token="[BOS]"
    )


V = 64  # vocab size of the tiny models (>= len(WORDS))
SMALL = dict(vocab_size=V, pad_token_id=0, eos_token_id=3, bos_token_id=2)


def tiny_model(family: str) -> torch.nn.Module:
    """A 2-layer random model of `family`, fp32, eval mode, seeded."""
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **SMALL,
        )
        return LlamaForCausalLM(cfg).eval()
    if family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL)
        return GPT2LMHeadModel(cfg).eval()
    if family == "opt":
        cfg = OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
            **SMALL,
        )
        return OPTForCausalLM(cfg).eval()
    if family == "qwen2":
        cfg = Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **SMALL,
        )
        return Qwen2ForCausalLM(cfg).eval()
    if family == "gemma3_text":
        cfg = Gemma3TextConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            sliding_window=16,
            **SMALL,
        )
        return Gemma3ForCausalLM(cfg).eval()
    if family == "bloom":
        return BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=4, **SMALL)).eval()
    if family == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            **SMALL,
        )
        return GPTNeoXForCausalLM(cfg).eval()
    if family == "bert":
        cfg = BertConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            num_labels=2,
            **SMALL,
        )
        return BertForSequenceClassification(cfg).eval()
    raise ValueError(family)


def toy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = rng.sample(FILL, 3) + [rng.choice(POS if label else NEG)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def route_rows(n_per_task: int, seed: int = 0) -> list[dict]:
    """A trivially separable instruction set: each task has its own words and its own answer."""
    rng = random.Random(seed)
    spec = {
        "alpha": (["red", "sky"], "one"),
        "beta": (["blue", "sea"], "two"),
        "gamma": (["green", "leaf"], "three"),
    }
    rows = []
    for task, (words, answer) in spec.items():
        for _ in range(n_per_task):
            text = " ".join(rng.choice(words) for _ in range(3))
            rows.append({"instruction": text, "output": answer, "task": task})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def toy_data(tmp_path: Path) -> tuple[str, str]:
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(48, 1))
    val = write_jsonl(tmp_path / "val.jsonl", toy_rows(16, 2))
    return str(train), str(val)


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A tiny Llama and the toy tokenizer saved as a model folder (for CLI and experiment runs)."""
    path = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def run_config(tmp_path: Path, toy_data: tuple[str, str], family: str = "llama", **over) -> dict:
    """A RunConfig mapping for the toy task on a tiny model of `family`."""
    classifier = family == "bert"
    cfg = {
        "model": {"name_or_path": f"tiny-{family}", "task": "classification" if classifier else "causal_lm"},
        "data": {
            "train": toy_data[0],
            "eval": toy_data[1],
            "prompt": "Review : {text} Sentiment :",
            "target": " {label}",
            "label_words": {"0": "negative", "1": "positive"},
            "max_length": 32,
        },
        "chain": {"links": [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}], "dropout": 0.0},
        "optim": {"lr": 0.01},
        "train": {"epochs": 2, "batch_size": 8, "save_every": 3, "seed": 0},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in over.items():
        section, _, name = key.partition("__")
        if name:
            cfg[section][name] = value
        else:
            cfg[section] = value
    return cfg
