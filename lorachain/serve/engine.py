"""The batching engine: one worker thread owns the model; requests for any adapters share batches.

Requests wait in a bounded queue. The worker takes the first, gathers more for a short window (up
to `max_batch`, and no more distinct adapters than the router's LRU holds), routes the `auto` ones
with the selector in one call, then decodes the whole batch greedily in one forward pass per token,
each row with its own adapter (PEFT's mixed-adapter batches), stopping each row on EOS, its
max_tokens or a stop string, and streaming text deltas back to the request's event queue.

Rows choose their tokens greedily or by seeded sampling with penalties (`serve/sampling.py`); a row
with `max_tokens` 0 only scores its prompt (`echo` log-probabilities, for lm-eval).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorachain.models import device_of
from lorachain.routing.select import Selection
from lorachain.serve.batched_lora import GatheredLoRA
from lorachain.serve.prompting import BASE
from lorachain.serve.router import Router
from lorachain.serve.sampling import Sampling, choose, prompt_logprobs, token_logprob

AUTO = "auto"
__all__ = ["AUTO", "BASE", "Engine", "GenRequest", "QueueFull"]


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask (B, T)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class QueueFull(RuntimeError):
    """The request queue is at its bound; the API answers 429."""


@dataclass
class GenRequest:
    """One generation job. `emit(kind, payload)` receives, from the worker thread, ("route",
    Selection), ("prompt_logprobs", [entry]), ("delta", text), ("logprobs", [entry]), ("tokens",
    completion token count) then ("done", finish_reason); or ("error", message)."""

    prompt_ids: list[int] | None  # None: built from `instruction` with the store's template
    adapter: str  # adapter name, BASE, or AUTO
    max_tokens: int
    emit: Callable[[str, object], None]
    instruction: str = ""
    stop: list[str] = field(default_factory=list)
    selection: Selection | None = None
    ignore_eos: bool = False  # generate max_tokens whatever (benchmarks; vLLM's extension)
    sampling: Sampling = field(default_factory=Sampling)


@dataclass
class _Row:
    req: GenRequest
    ids: list[int] = field(default_factory=list)  # generated tokens (no EOS)
    sent: int = 0  # characters already emitted
    done: bool = False
    generated: int = 0  # tokens the model produced, a final EOS included
    counts: Counter = field(default_factory=Counter)  # for the penalties
    gen: torch.Generator | None = None


class Engine:
    def __init__(
        self, router: Router, max_batch: int = 16, window_ms: float = 10.0, max_queue: int = 64
    ) -> None:
        self.router, self.max_batch, self.window = router, max_batch, window_ms / 1000
        self.queue: queue.Queue[GenRequest] = queue.Queue(maxsize=max_queue)
        self.stats: Counter = Counter()
        self.batch_sizes: Counter = Counter()
        self._held: list[GenRequest] = []  # taken from the queue but left for the next batch
        self._stop = threading.Event()
        self._full_logits = False
        self.thread = threading.Thread(target=self._loop, name="lorachain-engine", daemon=True)
        self.thread.start()

    # -- API side ----------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> None:
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            raise QueueFull(f"request queue is full ({self.queue.maxsize}); retry later") from None

    def depth(self) -> int:
        return self.queue.qsize() + len(self._held)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)

    # -- worker side -------------------------------------------------------------------------
    def _gather(self) -> list[GenRequest]:
        batch = self._held[: self.max_batch]
        self._held = self._held[self.max_batch :]
        if not batch:
            try:
                batch.append(self.queue.get(timeout=0.1))
            except queue.Empty:
                return []
        deadline = time.monotonic() + self.window
        while len(batch) < self.max_batch:
            try:
                batch.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._gather()
            if not batch:
                continue
            try:
                self._route(batch)
                batch = self._fit_cache(batch)
                self._decode(batch)
            except Exception as e:  # a failed batch answers its requests, the server lives on
                for req in batch:
                    req.emit("error", f"generation failed: {type(e).__name__}: {e}")

    def _route(self, batch: list[GenRequest]) -> None:
        auto = [r for r in batch if r.adapter == AUTO]
        if auto:
            for req, sel in zip(auto, self.router.select([r.instruction for r in auto]), strict=True):
                req.adapter, req.selection = sel.adapter, sel
                req.emit("route", sel)

    def _fit_cache(self, batch: list[GenRequest]) -> list[GenRequest]:
        """Keep the requests whose adapters fit in the LRU together; hold the rest for later."""
        allowed: list[str] = []
        keep = []
        for req in batch:
            name = req.adapter
            if name == BASE or name in allowed or len(allowed) < self.router.cache_size:
                if name != BASE and name not in allowed:
                    allowed.append(name)
                keep.append(req)
            else:
                self._held.append(req)
        for name in allowed:
            self.router.load(name)
        return keep

    @torch.no_grad()
    def _decode(self, batch: list[GenRequest]) -> None:
        tok, model = self.router.tok, self.router.model
        for req in batch:
            if req.prompt_ids is None:
                req.prompt_ids = self.router.answer_prompt(req.instruction, req.max_tokens)
        rows = [_Row(r, gen=r.sampling.generator()) for r in batch]
        names = [r.adapter if r.adapter == BASE else self.router.slot(r.adapter) for r in batch]
        self.batch_sizes[len(batch)] += 1
        for req in batch:
            self.stats[req.adapter] += 1
        device = device_of(model)
        ids, mask = left_pad([r.prompt_ids for r in batch], tok.pad_token_id, device)  # (B, T)
        width = ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        echo = any(r.sampling.echo for r in batch)
        with self._adapters(names):
            out = self._forward(ids, mask, positions, None, keep_all=echo)
            if echo:
                self._echo(rows, out.logits, width)
            for row in rows:
                if row.req.max_tokens <= 0:
                    self._finish(row, "length")
            for _ in range(max(r.max_tokens for r in batch)):
                if all(row.done for row in rows):
                    break
                nxt = self._next(rows, out.logits[:, -1])  # (B,)
                if all(row.done for row in rows):
                    break
                mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=torch.long, device=device)], dim=1)
                positions = positions[:, -1:] + 1
                out = self._forward(nxt[:, None], mask, positions, out.past_key_values)
        for row in rows:
            if not row.done:
                self._finish(row, "length")

    def _forward(self, ids, mask, positions, cache, keep_all: bool = False):
        """One step; only the last position's logits unless `keep_all` (prompt log-probs)."""
        kw = dict(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache)
        if keep_all or cache is not None or self._full_logits:
            return self.router.model(**kw, use_cache=True)
        try:
            return self.router.model(**kw, use_cache=True, logits_to_keep=1)
        except TypeError:  # a model without logits_to_keep
            self._full_logits = True
            return self.router.model(**kw, use_cache=True)

    def _echo(self, rows: list[_Row], logits: torch.Tensor, width: int) -> None:
        for i, row in enumerate(rows):
            s, prompt = row.req.sampling, row.req.prompt_ids
            if s.echo:  # logits (B, T, V); this row's prompt is its last len(prompt) positions
                entries = prompt_logprobs(logits[i, width - len(prompt) :], prompt, s.logprobs or 0)
                row.req.emit("prompt_logprobs", entries)

    def _next(self, rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """Each live row's next token from its logits (B, V); rows advance (and may finish)."""
        nxt = logits.argmax(-1).cpu()  # (B,) greedy; other rows choose below
        for i, row in enumerate(rows):
            if row.done:
                continue
            s = row.req.sampling
            if not s.plain:
                nxt[i] = choose(logits[i].cpu(), s, row.counts, row.gen)
            token = int(nxt[i])
            if s.logprobs is not None:
                lp = torch.log_softmax(logits[i].float(), dim=-1)
                row.req.emit("logprobs", [token_logprob(lp, token, s.logprobs)])
            row.counts[token] += 1
            self._advance(row, token)
        return nxt.to(logits.device)

    def _adapters(self, names: list[str]):
        """One adapter for the whole batch: switch to it (or disable LoRA for the base);
        several: each row its own adapter through gathered factors."""
        distinct = set(names)
        if distinct == {BASE}:
            return self.router.model.disable_adapter()
        if len(distinct) == 1:
            self.router.slots.switch(names[0])
            return contextlib.nullcontext()
        rows = [None if n == BASE else n for n in names]
        return GatheredLoRA(self.router.model, rows, self.router.slots.factors)

    def _advance(self, row: _Row, token: int) -> None:
        tok = self.router.tok
        row.generated += 1
        if token == tok.eos_token_id and not row.req.ignore_eos:
            self._finish(row, "stop")
            return
        row.ids.append(token)
        text = tok.decode(row.ids, skip_special_tokens=True)
        for s in row.req.stop:
            if s and s in text:
                self._flush(row, text[: text.index(s)])
                self._finish(row, "stop", flush=False)
                return
        if len(row.ids) >= row.req.max_tokens:
            self._flush(row, text)
            self._finish(row, "length")
            return
        hold = max((len(s) - 1 for s in row.req.stop), default=0)  # a stop string may be starting
        safe = len(text) - hold
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character
            safe = min(safe, len(text) - 1)
        self._flush(row, text[: max(safe, row.sent)])

    def _flush(self, row: _Row, text: str) -> None:
        if len(text) > row.sent:
            row.req.emit("delta", text[row.sent :])
            row.sent = len(text)

    def _finish(self, row: _Row, reason: str, flush: bool = True) -> None:
        if not row.done:
            if flush:
                self._flush(row, self.router.tok.decode(row.ids, skip_special_tokens=True))
            row.done = True
            self.stats["tokens"] += row.generated
            row.req.emit("tokens", row.generated)
            row.req.emit("done", reason)
