"""lm-eval through `lorachain serve` against lm-eval's own hf+peft backend, on SmolLM2-135M.

One command (needs `pip install "lm-eval[api]"`, run from the repository root):
`python benchmarks/lm_eval_agreement.py [--limit-sst2 40 --limit-gsm8k 5]`. It writes a store of
random r=8 q/v adapters on SmolLM2 (real files and manifest; the agreement is about the plumbing,
not the scores), starts `lorachain serve` on it, runs the printed `lm_eval` commands (SST-2 by
log-likelihood, GSM8K by generation, `examples/lm_eval/`) with `--log_samples`, and compares every
sample: log-likelihoods (max absolute difference) and generations (exactly equal or not).
Results: benchmarks/results/lm_eval_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTER = "sentiment"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lm_eval(args: list[str], out: Path) -> dict[str, list[dict]]:
    """Run the lm_eval CLI; the logged samples per task, in document order."""
    cmd = ["lm_eval", *args, "--include_path", "examples/lm_eval", "--log_samples", "--output_path", str(out)]
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    samples = {}
    for path in out.rglob("samples_*.jsonl"):
        task = path.name.removeprefix("samples_").rsplit("_", 1)[0]
        rows = [json.loads(x) for x in path.read_text().splitlines() if x]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return samples


def compare(a: list[dict], b: list[dict]) -> dict:
    """Per-sample agreement of two runs of one task."""
    if a and isinstance(a[0]["resps"][0][0], list):  # loglikelihood: [[ll, is_greedy]] per choice
        la = [float(r[0][0]) for s in a for r in s["resps"]]
        lb = [float(r[0][0]) for s in b for r in s["resps"]]
        acc_a, acc_b = (sum(s["acc"] for s in x) / len(x) for x in (a, b))
        diff = max(abs(x - y) for x, y in zip(la, lb, strict=True))
        return {"samples": len(a), "max_abs_loglik_diff": diff, "acc_server": acc_a, "acc_hf": acc_b}
    same = sum(s["resps"] == t["resps"] for s, t in zip(a, b, strict=True))
    em_a, em_b = (sum(s["exact_match"] for s in x) / len(x) for x in (a, b))
    return {"samples": len(a), "generations_equal": same, "exact_match_server": em_a, "exact_match_hf": em_b}


def make_store(root: Path) -> str:
    """A random-adapter store on SmolLM2; returns the resolved base folder (for lm-eval's hf)."""
    from lorachain.config import ModelConfig
    from lorachain.models import load_model, resolve_path
    from lorachain.store import random_store

    base = resolve_path(ModelConfig(name_or_path=MODEL))
    if not (root / "manifest.json").is_file():
        templates = {"prompt": "{instruction}", "task_prompt": "{instruction}\nTask:", "max_length": 256}
        model = load_model(ModelConfig(name_or_path=MODEL))
        labels = [ADAPTER, "math"]
        random_store(
            root, model, labels, templates, rank=8, target_modules=["q_proj", "v_proj"], base_name=MODEL
        )
    return base


def pairs(url: str, base: str, store: Path, args) -> list:
    """(name, task, limit, (server args, hf args)): a named adapter through /v1/completions against
    hf+peft, and `base` through /v1/chat/completions against hf with the same chat template."""
    completions = f"model={ADAPTER},base_url={url}/v1/completions,tokenizer={base},max_length=2048"
    chat = f"model=base,base_url={url}/v1/chat/completions"
    hf = ["--device", "cpu", "--batch_size", "8"]
    peft = [
        "--model",
        "hf",
        "--model_args",
        f"pretrained={base},peft={store / 'adapters' / ADAPTER},dtype=float32",
    ]
    plain = ["--model", "hf", "--model_args", f"pretrained={base},dtype=float32", "--apply_chat_template"]
    served = ["--model", "local-completions", "--model_args", completions]
    served_chat = ["--model", "local-chat-completions", "--model_args", chat, "--apply_chat_template"]
    return [
        ("sst2", "lorachain_sst2", args.limit_sst2, (served, peft + hf)),
        ("gsm8k", "lorachain_gsm8k", args.limit_gsm8k, (served, peft + hf)),
        ("gsm8k_chat", "lorachain_gsm8k", args.limit_gsm8k, (served_chat, plain + hf)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit-sst2", type=int, default=40)
    ap.add_argument("--limit-gsm8k", type=int, default=5)
    ap.add_argument("--work", default="runs/lm_eval_agreement")
    ap.add_argument("--out", default="benchmarks/results/lm_eval_agreement.json")
    args = ap.parse_args()
    work = Path(args.work)
    base = make_store(work / "store")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = subprocess.Popen(
        [sys.executable, "-m", "lorachain", "serve", str(work / "store"), "--port", str(port)]
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        result = {"model": MODEL, "adapter": ADAPTER, "commands": []}
        for name, task, limit, pair in pairs(url, base, work / "store", args):
            a, b = (["--tasks", task, "--limit", str(limit), *x] for x in pair)
            t0 = time.perf_counter()
            served = lm_eval(a, work / f"{name}_server")[task]
            t1 = time.perf_counter()
            hf = lm_eval(b, work / f"{name}_hf")[task]
            seconds = {"seconds_server": round(t1 - t0, 1), "seconds_hf": round(time.perf_counter() - t1, 1)}
            result[name] = compare(served, hf) | seconds
            result["commands"] += ["lm_eval " + shlex.join(a), "lm_eval " + shlex.join(b)]
    finally:
        serve.terminate()
        serve.wait(60)
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
