"""`data:` where the examples are and how a row becomes a prompt and a target."""

from __future__ import annotations

from dataclasses import dataclass

from lorachain.config.base import check

CHAT_CHOICES = {
    "format": ("auto", "text", "chat"),
    "train_on": ("all_assistant", "last"),
    "on_too_long": ("truncate", "skip"),
    "on_bad_rows": ("error", "skip"),
}


@dataclass
class DataConfig:
    """Where the examples are and how a row becomes a prompt and a target.

    `prompt` and `target` are `str.format` templates over the row's fields. With `label_words`, the
    value of `label_field` is first mapped to its verbalizer (causal LM) or class index (classifier),
    and evaluation reports accuracy by scoring every candidate.
    """

    train: str = ""  # JSONL, JSON, CSV or Parquet
    eval: str | None = None
    # text (prompt/target templates) | chat (OpenAI messages or ShareGPT conversations, rendered
    # with the chat template, loss on assistant turns) | auto (chat when rows have such a field)
    format: str = "auto"
    messages_field: str | None = None  # chat: default `messages`, else `conversations`
    chat_template: str | None = None  # chat: Jinja text or a .jinja file; default: the tokenizer's
    train_on: str = "all_assistant"  # chat: all_assistant | last (only the final assistant turn)
    on_too_long: str = "truncate"  # chat: truncate (context cut from the left) | skip
    on_bad_rows: str = "error"  # error | skip (skipped rows are listed on stderr)
    prompt: str = "{text}"
    target: str | None = " {label}"  # completion trained with the LM loss; None: LM loss on prompt
    label_field: str | None = "label"
    label_words: dict[str, str] | None = None  # label value -> verbalizer text
    max_length: int = 256
    eos: bool = True  # append EOS to free-text targets (not to label_words), so generation stops
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    # causal LM: several rows per training sequence up to max_length, none attending to another
    packing: bool = False

    def __post_init__(self) -> None:
        check(bool(self.train), "data.train: expected a path to a JSONL, JSON or CSV file")
        check(self.max_length > 0, f"data.max_length: expected > 0, got {self.max_length}")
        for name, allowed in CHAT_CHOICES.items():
            value = getattr(self, name)
            check(value in allowed, f"data.{name}: expected one of {allowed}, got {value!r}")
        if self.label_words is not None:
            check(len(self.label_words) >= 2, "data.label_words: expected at least two labels")
            check(self.label_field is not None, "data.label_field: required with label_words")
            self.label_words = {str(k): str(v) for k, v in self.label_words.items()}
