"""One base model in memory, adapters from a store: select a task, swap its adapter in, answer.

`Router.from_store(path).ask(instructions)` runs the task-selection adapter (`score` mode, a batch
of `score_batch` instructions per forward pass, or `generate` mode), picks each instruction's task
adapter (loaded from disk on first use, kept in a bounded LRU, sha256-checked against the manifest)
and generates the answers greedily, batched per adapter.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from peft import PeftModel

from lorachain.config import ConfigError, DataConfig, ModelConfig
from lorachain.data import prompt_ids
from lorachain.data.chat import chat_template, generation_ids, selector_text
from lorachain.models import best_device, device_of, load_model, load_tokenizer, resolve_path
from lorachain.routing.confidence import calibrated_msp
from lorachain.routing.gate import apply_evidence, apply_gate, routes_of
from lorachain.routing.select import Selection, decide, match_labels
from lorachain.routing.selectors import get_kind, label_ids, score_labels
from lorachain.serve.adapter_file import WEIGHTS
from lorachain.serve.slots import AdapterSlots
from lorachain.store import (
    MIXED,
    SELECTOR,
    Manifest,
    StoreError,
    check_base,
    check_complete,
    read_manifest,
    short_reason,
    verify_adapter,
    verify_selector,
)

MODES = ("score", "generate")


@dataclass
class Answer:
    instruction: str
    task: str | None
    top_k: list[dict]
    adapter: str
    answer: str
    fallback: str | None = None
    selector_output: str = ""
    timings: dict = field(default_factory=dict)  # select_s, swap_s, generate_s (per batch)


def asks_evidence(path: str | Path) -> bool:
    """Whether the store's config asks for `selector.evidence: validation` (routing.eval.evidence)."""
    cfg = Path(path) / "route_config.json"
    if not cfg.is_file():
        return False
    return (json.loads(cfg.read_text()).get("selector") or {}).get("evidence") == "validation"


class Router:
    """The base model wrapped once by PEFT; the selector stays loaded, task adapters come and go."""

    def __init__(
        self,
        root: str | Path,
        manifest: Manifest,
        model: PeftModel,
        tokenizer,
        *,
        mode: str = "score",
        top_k: int = 3,
        cache_size: int = 8,
        fallback: str = MIXED,
        min_confidence: float = 0.0,
        min_in_distribution: float | None | str = "store",
        max_new_tokens: int = 64,
        score_batch: int = 8,
        gate_margin: float | None | str = "store",
        evidence: bool = True,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode: expected one of {MODES}, got {mode!r}")
        if fallback not in manifest.adapters:
            raise ConfigError(
                f"fallback: no adapter {fallback!r} in the store; known: {sorted(manifest.adapters)}"
            )
        if cache_size < 1:
            raise ConfigError("cache_size: expected >= 1")
        if score_batch < 1:
            raise ConfigError("score_batch: expected >= 1")
        self.root, self.manifest, self.model, self.tok = Path(root), manifest, model, tokenizer
        self.mode, self.top_k, self.cache_size = mode, top_k, cache_size
        self.fallback, self.min_confidence, self.max_new_tokens = fallback, min_confidence, max_new_tokens
        if min_in_distribution == "store":  # the threshold fitted with the selector, if any
            min_in_distribution = (manifest.selector.get("calibration") or {}).get("threshold")
        self.min_in_distribution = min_in_distribution
        if gate_margin == "store":  # the store's `selector.gate` (routing.gate), if it has one
            gate_margin = (manifest.selector.get("gate") or {}).get("margin")
        self.gate_margin = gate_margin  # None: no answer-side gate
        # the adapters the store's `selector.evidence` lets answer (routing.evidence); None: no rule
        self.evidence = routes_of(manifest.selector) if evidence else None
        self.slots = AdapterSlots(model, cache_size)  # resident task/mixed adapters (LRU), PEFT slots
        self.labels = manifest.labels
        t = manifest.templates
        self.select_cfg = DataConfig(
            train="-",
            prompt=t["task_prompt"],
            target=" {label}",
            label_field="task",
            label_words={x: x for x in self.labels},
            max_length=t["max_length"],
        )
        self.answer_cfg = DataConfig(
            train="-", prompt=t["prompt"], target="{output}", label_field=None, max_length=t["max_length"]
        )
        self.chat = t.get("chat")  # a chat store: adapters answer the whole conversation
        if self.chat:
            override = self.chat if isinstance(self.chat, str) else None
            self.answer_cfg = replace(
                self.answer_cfg,
                format="chat",
                messages_field="messages",
                chat_template=override,
                train_on="last",
            )
            self.chat_template = chat_template(tokenizer, override, "templates.chat")
        self.label_ids = label_ids(tokenizer, self.labels)
        self.adapters = {a["task"]: name for name, a in manifest.adapters.items() if a["kind"] == "task"}
        self.selector_fn = None  # set by from_store for selector kinds other than `lora`
        self.second_fn, self.min_second = None, None  # the store's second opinion, if it has one
        self.score_batch = score_batch  # instructions per selector forward pass in `score` mode

    @classmethod
    def from_store(cls, path: str | Path, model=None, tokenizer=None, **kwargs) -> Router:
        """Open a store: check the base model's fingerprint and the selector's files, load it."""
        manifest = read_manifest(path)
        check_complete(path, manifest)  # before the slow part
        b = manifest.base_model
        mcfg = ModelConfig(
            name_or_path=b["name_or_path"], gguf_file=b.get("gguf_file"), dtype=b.get("dtype", "float32")
        )
        tokenizer = tokenizer or load_tokenizer(resolve_path(mcfg))
        model = model if model is not None else load_model(mcfg).to(best_device())
        check_base(path, manifest, model)
        kind = get_kind(manifest.selector.get("kind"), f"{Path(path) / 'manifest.json'}: selector.kind")
        first = SELECTOR if kind.load is None else MIXED  # other kinds: PEFT wraps with the mixed one
        folder = verify_adapter(path, manifest, first)
        try:
            peft = PeftModel.from_pretrained(model, str(folder), adapter_name=first).eval()
        except (RuntimeError, ValueError, KeyError) as e:  # shapes or names that do not fit the base
            raise StoreError(f"{folder}: does not fit the base model ({short_reason(e)})") from None
        router = cls(path, manifest, peft, tokenizer, **kwargs)
        if router.evidence is None and kwargs.get("evidence", True) and asks_evidence(path):
            warnings.warn(
                f"{path}: selector.evidence is 'validation' but the store has none measured, so every task "
                f"adapter may answer; run `lorachain route evidence {path}`",
                stacklevel=2,
            )
        if kind.load is not None:
            router.slots.adopt(MIXED, folder)
            router.selector_fn = kind.load(router, verify_selector(path, manifest), manifest.selector)
        second = manifest.selector.get("second_opinion")
        if second:  # another kind, fitted beside the selector (routing.second_opinion)
            other = get_kind(
                second.get("kind"), f"{Path(path) / 'manifest.json'}: selector.second_opinion.kind"
            )
            folder = verify_selector(path, replace(manifest, selector=second))
            router.second_fn = other.load(router, folder, second)
            router.min_second = (second.get("calibration") or {}).get("threshold")
        return router

    # -- adapters ----------------------------------------------------------------------------
    @property
    def cache(self) -> list[str]:
        """Names of the loaded task/mixed adapters, least recently used first."""
        return list(self.slots.lru)

    def slot(self, name: str) -> str:
        """Load adapter `name` if needed; the name `slots.switch` and `slots.factors` (for
        GatheredLoRA) take for it: the adapter's own name (or the selector's)."""
        self.load(name)
        return name

    def load(self, name: str) -> bool:
        """Make sure adapter `name` is loaded (LRU-bounded, sha256-checked); True if it was cold."""
        if name == SELECTOR or name in self.slots.lru:
            if name != SELECTOR:
                self.slots.lru.move_to_end(name)
            return False
        return self.slots.load(name, *self._verified(name))

    def _verified(self, name: str) -> tuple[Path, str | None]:
        """`verify_adapter`, except that the weights file's sha256 is returned, for the slot to
        check on the one read that loads it (no second read of the file)."""
        entry = self.manifest.adapters.get(name)
        weights = f"{entry['path']}/{WEIGHTS}" if entry else None
        if entry is None or weights not in entry["files"]:
            return verify_adapter(self.root, self.manifest, name), None
        rest = {k: v for k, v in entry["files"].items() if k != weights}
        verify_adapter(self.root, replace(self.manifest, adapters={name: {**entry, "files": rest}}), name)
        return self.root / entry["path"], entry["files"][weights]

    def activate(self, name: str) -> bool:
        """Load adapter `name` if needed and make it the active one; True if it was cold."""
        cold = self.load(name)
        self.slots.switch(self.slot(name))
        return cold

    # -- selection ---------------------------------------------------------------------------
    @torch.no_grad()
    def select(self, instructions: list[str], mode: str | None = None) -> list[Selection]:
        """Rank the task labels for each instruction and choose an adapter."""
        mode = mode or self.mode
        if self.selector_fn is None:
            self.activate(SELECTOR)
        if self.selector_fn is not None:  # an encoder, embedding or full selector ranks every label
            sels = self.selector_fn(instructions)
        elif mode == "score":
            args = (self.model, self.tok, self.select_cfg, self.label_ids, self.labels, instructions)
            sels = score_labels(*args, self.score_batch)
        else:
            longest = max(len(ids) for ids in self.label_ids) + 4
            prompts = [
                prompt_ids(self.select_cfg, self.tok, {"instruction": x}, longest) for x in instructions
            ]
            texts = self._generate(prompts, longest)
            sels = [Selection(match_labels(t, self.labels), [], t) for t in texts]
        if self.second_fn is not None:
            self._second_opinions(sels, instructions)
        floors = (self.min_confidence, self.min_in_distribution, self.min_second)
        for sel in sels:
            decide(sel, set(self.adapters), self.fallback, *floors)
            if sel.adapter in self.adapters:
                sel.adapter = self.adapters[sel.adapter]
        if self.evidence is not None:
            apply_evidence(sels, self.evidence, self.fallback)
        if self.gate_margin is not None:
            apply_gate(self, sels, instructions, self.fallback, self.gate_margin)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the selector's activations are not kept
        return sels

    def _second_opinions(self, sels: list[Selection], instructions: list[str]) -> None:
        """Attach the second opinion to each selection; kinds that score no confidence of their own
        get their calibrated msp."""
        entry = self.manifest.selector
        for sel, other in zip(sels, self.second_fn(instructions), strict=True):
            if sel.in_distribution is None:
                sel.in_distribution = calibrated_msp(sel, entry.get("calibration"))
            if other.in_distribution is None:
                other.in_distribution = calibrated_msp(other, entry["second_opinion"].get("calibration"))
            sel.second = other

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy decoding of a left-padded batch; returns only the new text."""
        pad = self.tok.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device_of(self.model)), mask.to(device_of(self.model))
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=self.tok.eos_token_id,
        )
        return self.tok.batch_decode(out[:, width:], skip_special_tokens=True)

    def selector_text(self, messages: list[dict]) -> str:
        """What the selector reads of a conversation: the last user turn, or for a chat store its
        `selector_input` (by default the system prompt and the last user turn)."""
        if self.chat:
            return selector_text(messages, self.manifest.templates.get("selector_input", "system_last_user"))
        users = [m["content"] for m in messages if m["role"] == "user"]
        return users[-1] if users else messages[-1]["content"]

    def answer_prompt(self, instruction: str | list[dict], max_new_tokens: int = 0) -> list[int]:
        """Prompt ids for an adapter: the store's template around the instruction, or for a chat
        store the conversation (a text is one user turn) through the chat template."""
        if self.chat:
            messages = (
                [{"role": "user", "content": instruction}] if isinstance(instruction, str) else instruction
            )
            return generation_ids(
                self.tok, messages, self.chat_template, self.answer_cfg.max_length, max_new_tokens
            )
        if not isinstance(instruction, str):
            instruction = self.selector_text(instruction)
        return prompt_ids(self.answer_cfg, self.tok, {"instruction": instruction}, max_new_tokens)

    def ask(
        self,
        instructions: str | list[str] | list[list[dict]],
        mode: str | None = None,
        adapter: str | None = None,
        max_new_tokens: int | None = None,
    ) -> list[Answer]:
        """Route and answer a batch of instructions or conversations (lists of messages);
        `adapter` skips selection and uses that adapter."""
        batch = [instructions] if isinstance(instructions, str) else list(instructions)
        asked = [x if isinstance(x, str) else self.selector_text(x) for x in batch]
        t0 = time.perf_counter()
        if adapter is None:
            sels = self.select(asked, mode)
        else:
            if adapter not in self.manifest.adapters or adapter == SELECTOR:
                raise ConfigError(f"adapter: unknown {adapter!r}; known: {sorted(self.adapters.values())}")
            sels = [Selection([], [], adapter=adapter) for _ in batch]
        select_s = time.perf_counter() - t0
        answers: list[Answer | None] = [None] * len(batch)
        for name in dict.fromkeys(s.adapter for s in sels):
            idx = [i for i, s in enumerate(sels) if s.adapter == name]
            t1 = time.perf_counter()
            self.activate(name)
            t2 = time.perf_counter()
            new = max_new_tokens or self.max_new_tokens
            texts = self._generate([self.answer_prompt(batch[i], new) for i in idx], new)
            t3 = time.perf_counter()
            for i, text in zip(idx, texts, strict=True):
                s = sels[i]
                answers[i] = Answer(
                    asked[i],
                    s.ranked[0] if s.ranked else None,
                    s.top(self.top_k),
                    name,
                    text.strip(),
                    s.fallback,
                    s.text,
                    {"select_s": select_s, "swap_s": t2 - t1, "generate_s": t3 - t2},
                )
        return answers  # type: ignore[return-value]
