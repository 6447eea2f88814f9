"""`lorachain demo`: COLA (rank 8 then 4) against plain LoRA at the same budget, on SmolLM2-135M
and a few hundred embedded SST-2 rows; then a small task-routing store on embedded T0 rows, its
routed task adapters against the base model and the mixed adapter. Prints the tables and writes
JSON and a PNG."""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing as mp
import signal
import sys
import time
from pathlib import Path

from lorachain.config import RunConfig, from_dict
from lorachain.io import write_json

DATA = Path(__file__).parent / "demo_data"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

METHODS = {
    "LoRA r=8": [{"rank": 8, "alpha": 16}],
    "COLA 8→4": [{"rank": 8, "alpha": 16, "fraction": 0.6}, {"rank": 4, "alpha": 8, "fraction": 0.4}],
}


def demo_config(out: Path, links: list[dict], steps: int | None, precision: str = "auto") -> dict:
    return {
        "model": {"name_or_path": MODEL},
        "data": {
            "train": str(DATA / "sst2_train.jsonl"),
            "eval": str(DATA / "sst2_eval.jsonl"),
            "prompt": "Review: {sentence}\nSentiment:",
            "target": " {label}",
            "label_words": {"0": "negative", "1": "positive"},
            "max_length": 64,
        },
        "chain": {"links": links, "target_modules": ["q_proj", "v_proj"], "dropout": 0.05},
        "optim": {"name": "adamw", "lr": 1e-3, "schedule": "linear"},
        "train": {
            "epochs": 1,
            "max_steps": steps,
            "batch_size": 8,
            "save_every": 10,
            "seed": 0,
            "precision": precision,
        },
        "output_dir": str(out),
    }


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (from `timeout`, a supervisor, a CI runner) raises KeyboardInterrupt here, so that
    cleanup runs and the children are taken down, as with Ctrl-C."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _child_main(conn, fn, args) -> None:
    """In the worker: die with the parent (Linux PR_SET_PDEATHSIG), run, send the result back."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # the parent re-raises it with the child's message
        conn.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run_in_child(fn, *args):
    """`fn(*args)` in a fresh spawned process (a clean peak-memory reading), its result returned.
    The child never outlives this process: an interrupt or SIGTERM here stops it (training
    checkpoints and exits), and it gets SIGTERM from the kernel if this process is killed."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, fn, args), daemon=True)
    proc.start()
    send.close()
    answered = False
    try:
        status, value = recv.recv()
        answered = True
    except EOFError:
        proc.join()
        raise RuntimeError(f"worker process died (exit code {proc.exitcode})") from None
    finally:
        if answered:  # let it exit by itself: a terminated child leaves its semaphores (tqdm's
            proc.join(60)  # lock) registered, and the resource tracker warns about them at exit
        if proc.is_alive():
            proc.terminate()
            proc.join(60)
            if proc.is_alive():
                proc.kill()
        proc.join()
        recv.close()
    if status == "error":
        raise RuntimeError(f"worker process failed: {value}")
    return value


def _train_in_child(cfg_dict: dict) -> dict:
    from lorachain.training.loop import train

    return train(from_dict(RunConfig, cfg_dict)).summary


def _zero_shot(cfg_dict: dict) -> dict:
    from lorachain.data import candidate_ids, load_examples
    from lorachain.models import load_model, load_tokenizer, resolve_path
    from lorachain.training.evaluate import evaluate

    cfg = from_dict(RunConfig, cfg_dict)
    tok = load_tokenizer(resolve_path(cfg.model))
    model = load_model(cfg.model)
    examples = load_examples(cfg.data.eval, cfg.data, tok, classifier=False)
    cands = candidate_ids(cfg.data, tok)
    return evaluate(model, examples, tok.pad_token_id, cfg.train.eval_batch_size, False, cands)


def format_table(rows: list[dict]) -> str:
    cols = ["method", "links", "steps", "train_loss", "eval_loss", "accuracy", "train_s", "peak_mem_mb"]
    return "\n".join(align([cols] + [[str(r[c]) for c in cols] for r in rows]))


ROUTING_EPOCHS = 3  # every adapter of the routing store: this many passes over its own train rows
ROUTING_KINDS = ("routed", "base", "mixed")


def routing_config(
    out: Path, precision: str = "auto", epochs: int = ROUTING_EPOCHS, model: str = MODEL
) -> dict:
    """Four task adapters, a selector and a mixed adapter on 160 embedded T0 rows (40 per task).
    Each gets the same per-example budget, `epochs` passes over its own train rows: a task
    adapter over its task's rows, the mixed adapter and the selector over all of them."""
    budget = {"epochs": epochs, "batch_size": 4, "seed": 0, "save_every": 10, "precision": precision}
    return {
        "model": {"name_or_path": model},
        "data": {"path": str(DATA / "t0_routing.jsonl"), "max_length": 128, "max_eval_rows": 8},
        "chain": {"links": [{"rank": 8, "alpha": 16}], "target_modules": ["q_proj", "v_proj"]},
        "optim": {"name": "adamw", "lr": 1e-3},
        "train": budget,
        "selector_train": budget,
        "mixed_train": budget,
        # the paper's task-selection LoRA, trained like the adapters; every task adapter may answer
        # (the paper's routing in distribution: the demo shows it, without issue 43's gate)
        "selector": {"kind": "lora", "gate": "none"},
        "output_dir": str(out),
    }


def _route_train_in_child(cfg_dict: dict) -> None:
    from lorachain.routing.config import RouteConfig
    from lorachain.routing.train import route_train

    if route_train(from_dict(RouteConfig, cfg_dict)) is None:
        raise RuntimeError("routing store training was interrupted; run the demo again to resume")


def store_budget(store: Path) -> dict[str, dict]:
    """adapter -> what it was trained with: kind, epochs, batch size, train rows, optimizer steps."""
    from lorachain.store import read_manifest

    cfg = json.loads((store / "route_config.json").read_text())
    out = {}
    for name, a in read_manifest(store).adapters.items():
        train = (cfg.get(f"{a['kind']}_train") if a["kind"] != "task" else None) or cfg["train"]
        s = a["summary"]
        out[name] = {
            "kind": a["kind"],
            "epochs": train["epochs"],
            "batch_size": train["batch_size"],
            "train_rows": s["train_examples"],
            "steps": s["total_steps"],
        }
    return out


def routing_summary(router, store: Path, out: Path, max_new_tokens: int = 24) -> dict:
    """`route_eval` on the store's test split (selector in score mode), cut down to the demo's
    table: per task and over all rows, the selector's top-1 and, for the routed task adapters, the
    base model and the mixed adapter, perplexity of the reference and exact match / ROUGE-L of the
    greedy answer."""
    from lorachain.routing.eval.store import route_eval

    r = route_eval(router, store, out, modes=("score",), max_new_tokens=max_new_tokens)
    sel = r["selection"]["score"]

    def row(n: int, top1: float, ppl: dict, quality: dict) -> dict:
        return {
            "n": n,
            "selector_top1": top1,
            "perplexity": {k: ppl[k] for k in ROUTING_KINDS},
            "exact_match": {k: quality[k]["exact_match"] for k in ROUTING_KINDS},
            "rougeL": {k: quality[k]["rougeL"] for k in ROUTING_KINDS},
        }

    table = {}
    for t, n in r["per_task_rows"].items():
        ppl = {k: r["perplexity"][k][t] for k in ROUTING_KINDS}
        quality = {k: r["quality"][k][t] for k in ROUTING_KINDS}
        table[t] = row(n, sel["per_task"][t]["top1"], ppl, quality)
    o = r["overall"]
    table["all"] = row(o["rows"], sel["top1"], o["perplexity"], o["quality"])
    return {
        "table": table,
        "selector_top1": sel["top1"],
        "selector_top3": sel["top3"],
        "test_instructions": r["test_rows"],
        "max_new_tokens": max_new_tokens,
        "budget": store_budget(store),
        "report": str(Path(out) / "route_eval.md"),
    }


def align(lines: list[list[str]], titles: dict[int, str] | None = None) -> list[str]:
    """Columns padded to their widest cell (the first left-aligned, the rest right-aligned);
    `titles` puts a group title above the column of each index."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = [
        "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    if titles:
        head = ""
        for i, title in sorted(titles.items()):
            head = head.ljust(sum(widths[:i]) + 2 * i) + title + " "
        out.insert(0, head.rstrip())
    return out


def format_routing(summary: dict) -> str:
    """The demo's routing table: per task and overall, routed vs base vs mixed."""
    groups = [
        ("perplexity", "perplexity ↓", "{:.2f}"),
        ("exact_match", "exact match ↑", "{:.3f}"),
        ("rougeL", "ROUGE-L ↑", "{:.3f}"),
    ]
    lines = [["task", "n", "top-1"] + [k for _ in groups for k in ROUTING_KINDS]]
    for t, r in summary["table"].items():
        cells = [t, str(r["n"]), f"{r['selector_top1']:.3f}"]
        lines.append(cells + [f.format(r[key][k]) for key, _, f in groups for k in ROUTING_KINDS])
    titles = {3 + len(ROUTING_KINDS) * g: name for g, (_, name, _) in enumerate(groups)}
    return "\n".join(align(lines, titles))


def budget_lines(budget: dict[str, dict]) -> list[str]:
    """What each adapter was trained with, in words (task adapters folded into one line)."""

    def epochs(b: dict) -> str:
        return f"{b['epochs']:g} epoch" + ("" if b["epochs"] == 1 else "s")

    tasks = [b for b in budget.values() if b["kind"] == "task"]
    lines = [
        f"  each of the {len(tasks)} task adapters: {epochs(tasks[0])} over its own task's "
        f"{'/'.join(sorted({str(b['train_rows']) for b in tasks}))} train rows "
        f"({'/'.join(sorted({str(b['steps']) for b in tasks}))} steps of {tasks[0]['batch_size']})"
    ]
    for b in budget.values():
        if b["kind"] != "task":
            lines.append(
                f"  {b['kind']} adapter: {epochs(b)} over all {b['train_rows']} train rows "
                f"({b['steps']} steps of {b['batch_size']})"
            )
    return lines


def run_routing_demo(
    out: Path, precision: str = "auto", epochs: int = ROUTING_EPOCHS, model: str = MODEL
) -> dict:
    """Train a small adapter store, then compare on its test split the routed task adapters with
    the base model and the mixed adapter; answer one instruction per task as an example."""
    import time

    from lorachain.serve.router import Router

    out, store = Path(out), Path(out) / "store"
    t0 = time.perf_counter()
    run_in_child(_route_train_in_child, routing_config(store, precision, epochs, model))
    t1 = time.perf_counter()
    router = Router.from_store(store, mode="score", max_new_tokens=24)
    summary = routing_summary(router, store, out / "eval", max_new_tokens=24)
    t2 = time.perf_counter()
    test = [json.loads(x) for x in (store / "splits" / "test.jsonl").read_text().split("\n") if x]
    examples = list({r["task"]: r for r in test}.values())
    answers = router.ask([r["instruction"] for r in examples])
    summary["wall_seconds"] = {"train": t1 - t0, "eval": t2 - t1, "total": time.perf_counter() - t0}
    summary["examples"] = [
        {
            "instruction": r["instruction"],
            "task": r["task"],
            "routed": a.adapter,
            "top_k": a.top_k,
            "answer": a.answer,
            "reference": r["output"],
            "timings": a.timings,
        }
        for r, a in zip(examples, answers, strict=True)
    ]
    print_routing(summary)
    return summary


def print_routing(summary: dict) -> None:
    n, w = summary["test_instructions"], summary["wall_seconds"]
    print(f"\nrouting: {n} test instructions, greedy answers of up to {summary['max_new_tokens']} tokens")
    print("budget (an epoch is one pass over the adapter's own train rows):")
    print("\n".join(budget_lines(summary["budget"])))
    print("\n" + format_routing(summary))
    print(
        "routed: the task adapter the selector picked (top-1: how often that was the true task); base: "
        "no adapter;\nmixed: one adapter trained on all tasks. Perplexity of the reference answer; exact "
        "match and ROUGE-L\nof the greedy answer (every reference is a short label or phrase, so exact "
        "match is accuracy)."
    )
    for x in summary["examples"]:
        print(f"  [{x['task']} -> {x['routed']}] answer {x['answer']!r}, reference {x['reference']!r}")
    print(
        f"routing part: {w['total']:.0f} s (store trained in {w['train']:.0f} s, evaluated in "
        f"{w['eval']:.0f} s); full report: {summary['report']}"
    )


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, precision: str = "auto") -> list[dict]:
    """Train each method in its own process (a clean peak-memory reading), then compare; then
    train a small task-routing store and answer routed instructions."""
    import os

    from lorachain.training.plots import plot_runs

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never needs the network
    out = Path(out)
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    zero = _zero_shot(demo_config(out / "zero", [{"rank": 8}], steps, precision))
    rows = [
        {
            "method": "base (zero-shot)",
            "links": "-",
            "steps": 0,
            "train_loss": "-",
            "eval_loss": f"{zero['eval_loss']:.4f}",
            "accuracy": f"{zero['accuracy']:.3f}",
            "train_s": "-",
            "peak_mem_mb": "-",
        }
    ]
    runs = {}
    for name, links in METHODS.items():
        run_dir = out / name.split()[0].lower()
        s = run_in_child(_train_in_child, demo_config(run_dir, links, steps, precision))
        runs[name] = run_dir
        rows.append(
            {
                "method": name,
                "links": "→".join(str(link["rank"]) for link in s["links"]),
                "steps": s["total_steps"],
                "train_loss": f"{s['links'][-1]['final_loss']:.4f}",
                "eval_loss": f"{s['final_eval']['eval_loss']:.4f}",
                "accuracy": f"{s['final_eval']['accuracy']:.3f}",
                "train_s": f"{s['wall_seconds']:.1f}",
                "peak_mem_mb": f"{s['peak_memory_mb']:.0f}",
            }
        )
    table = format_table(rows)
    print("\n" + table)
    plot = plot_runs(runs, out / "demo.png")
    routing = run_routing_demo(out / "routing", precision)
    total = {"wall_seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu0}
    total["load_average_at_end"] = list(os.getloadavg())  # a busy machine stretches the wall time
    results = {"cola": rows, "eval_examples": 200, "model": MODEL, "routing": routing, "total": total}
    write_json(out / "demo_results.json", results)
    print(f"\nresults: {out / 'demo_results.json'}  plot: {plot}")
    print(f"demo: {total['wall_seconds'] / 60:.1f} min of wall time, {total['cpu_seconds']:.0f} s of CPU")
    return rows


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the demo's workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    print(json.dumps(run_demo(), indent=2))
