"""`lorachain demo`: COLA (rank 8 then 4) against plain LoRA at the same budget, on SmolLM2-135M
and a few hundred embedded SST-2 rows; prints a side-by-side table and writes JSON and a PNG."""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing as mp
import signal
import sys
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
    try:
        status, value = recv.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"worker process died (exit code {proc.exitcode})") from None
    finally:
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
    from lorachain.train import train

    return train(from_dict(RunConfig, cfg_dict)).summary


def _zero_shot(cfg_dict: dict) -> dict:
    from lorachain.data import candidate_ids, load_examples
    from lorachain.evaluate import evaluate
    from lorachain.models import load_model, load_tokenizer, resolve_path

    cfg = from_dict(RunConfig, cfg_dict)
    tok = load_tokenizer(resolve_path(cfg.model))
    model = load_model(cfg.model)
    examples = load_examples(cfg.data.eval, cfg.data, tok, classifier=False)
    cands = candidate_ids(cfg.data, tok)
    return evaluate(model, examples, tok.pad_token_id, cfg.train.eval_batch_size, False, cands)


def format_table(rows: list[dict]) -> str:
    cols = ["method", "links", "steps", "train_loss", "eval_loss", "accuracy", "train_s", "peak_mem_mb"]
    lines = [cols] + [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines)


def routing_config(out: Path, precision: str = "auto") -> dict:
    """Four task adapters, a selector and a mixed adapter on 160 embedded T0 rows (40 per task)."""
    budget = {"epochs": 2, "batch_size": 4, "seed": 0, "save_every": 10, "precision": precision}
    return {
        "model": {"name_or_path": MODEL},
        "data": {"path": str(DATA / "t0_routing.jsonl"), "max_length": 128, "max_eval_rows": 8},
        "chain": {"links": [{"rank": 8, "alpha": 16}], "target_modules": ["q_proj", "v_proj"]},
        "optim": {"name": "adamw", "lr": 1e-3},
        "train": budget,
        "selector_train": budget,
        "mixed_train": {**budget, "epochs": 1},
        "output_dir": str(out),
    }


def _route_train_in_child(cfg_dict: dict) -> None:
    from lorachain.config import RouteConfig
    from lorachain.routing.train import route_train

    route_train(from_dict(RouteConfig, cfg_dict))


def run_routing_demo(out: Path, precision: str = "auto") -> dict:
    """Train a small adapter store, then route the test split and answer one instruction per task."""
    from lorachain.metrics import top_k_accuracy
    from lorachain.serve.router import Router

    store = out / "store"
    with mp.get_context("spawn").Pool(1) as pool:
        pool.apply(_route_train_in_child, (routing_config(store, precision),))
    router = Router.from_store(store, mode="score", max_new_tokens=24)
    test = [json.loads(x) for x in (store / "splits" / "test.jsonl").read_text().split("\n") if x]
    sels = [
        s for k in range(0, len(test), 8) for s in router.select([r["instruction"] for r in test[k : k + 8]])
    ]
    acc = {k: top_k_accuracy([s.ranked for s in sels], [r["task"] for r in test], k) for k in (1, 3)}
    examples = list({r["task"]: r for r in test}.values())
    answers = router.ask([r["instruction"] for r in examples])
    print(f"\nrouting: selector top-1 {acc[1]:.3f}, top-3 {acc[3]:.3f} on {len(test)} test instructions")
    shown = []
    for r, a in zip(examples, answers, strict=True):
        top = a.top_k[0]
        print(f"\n> {r['instruction'][:160]}" + ("…" if len(r["instruction"]) > 160 else ""))
        print(f"  true task {r['task']}; routed to {a.adapter} (p={top['score']:.2f})")
        print(f"  answer: {a.answer!r}   reference: {r['output']!r}")
        shown.append(
            {
                "instruction": r["instruction"],
                "task": r["task"],
                "routed": a.adapter,
                "top_k": a.top_k,
                "answer": a.answer,
                "reference": r["output"],
                "timings": a.timings,
            }
        )
    return {
        "selector_top1": acc[1],
        "selector_top3": acc[3],
        "test_instructions": len(test),
        "examples": shown,
    }


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, precision: str = "auto") -> list[dict]:
    """Train each method in its own process (a clean peak-memory reading), then compare; then
    train a small task-routing store and answer routed instructions."""
    import os

    from lorachain.plots import plot_runs

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo never needs the network
    out = Path(out)
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
    write_json(
        out / "demo_results.json", {"cola": rows, "eval_examples": 200, "model": MODEL, "routing": routing}
    )
    print(f"\nresults: {out / 'demo_results.json'}  plot: {plot}")
    return rows


if __name__ == "__main__":
    print(json.dumps(run_demo(), indent=2))
