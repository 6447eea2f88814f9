"""Chat test kit: a byte-level BPE tokenizer trained in-process, three template families
(ChatML as in SmolLM2, Llama-3 style, Gemma style), a tiny Llama sized to it, and chat rows."""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (  # SmolLM2-135M-Instruct's template, verbatim
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] | trim + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim "
    "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
FAMILIES = {  # template, bos, end of turn (eos)
    "chatml": (CHATML, None, "<|im_end|>"),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, "<bos>", "<end_of_turn>"),
}
SPECIAL = [
    "<pad>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
]
CORPUS = [
    "You are a helpful assistant. Answer in one word.",
    "What colour is the sky? The sky is blue. What colour is grass? Grass is green.",
    "My name is Ada. What is my name? Your name is Ada. Nice to meet you.",
    "How much is two plus two? It is four. Add one more: five.",
    "system user assistant tool model weather sunny rainy today tomorrow",
]


def chat_tokenizer(family: str = "chatml", template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~400 tokens) with the family's special tokens and template."""
    tpl, bos, eos = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos, bos_token=bos)
    if template:
        out.chat_template = tpl
    return out


def chat_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer random Llama whose vocabulary fits `tokenizer`."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "My name is Ada."},
    {"role": "assistant", "content": "Nice to meet you."},
    {"role": "user", "content": "What is my name?"},
    {"role": "assistant", "content": "Your name is Ada."},
]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Two-turn conversations about colours, OpenAI messages format."""
    rng = random.Random(seed)
    things = [("sky", "blue"), ("grass", "green"), ("weather", "sunny")]
    rows = []
    for _ in range(n):
        a, b = rng.sample(things, 2)
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": f"What colour is the {a[0]}?"},
                    {"role": "assistant", "content": a[1]},
                    {"role": "user", "content": f"What colour is the {b[0]}?"},
                    {"role": "assistant", "content": b[1]},
                ]
            }
        )
    return rows
