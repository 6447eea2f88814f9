"""What moves a sentence-embedding selector on data sets it never saw: leave-one-data-set-out.

One command: `python benchmarks/selector_variants.py [--per-dataset 60] [--cache FILE]`.
Rows: up to `--per-dataset` instructions (seeded) of each of the T0 mixture's 29 data sets
(`../shared/data/instructions/t0_mixture.jsonl`), labelled by task type (8). Each data set of a
task type that has others is held out in turn; the selector is built from the other 28 and
tested on it (closed-book QA and structure-to-text have one data set each and cannot be held
out). Every variant uses the same frozen all-MiniLM-L6-v2 embeddings (mean-pooled, unit length),
so the only differences are what part of an instruction is read and how labels are scored:

- truncation: `head` (first 128 tokens, what the `embedding` kind does), `head_tail` (first and
  last 63 tokens: T0 templates often put the task's wording after a long passage), `head_tail256`;
- scoring: `centroid` (one centroid per task, the `embedding` kind), `dataset_centroids` (one
  centroid per training data set, a task scores its best one), `linear_probe` (a logistic
  regression on the embeddings, rows weighted so every data set counts equally), `knn10`,
  `+label_names` (the cosine to the embedded task name added to `dataset_centroids`, weight 0.5).

Writes `results/routing_holdout/variants/variants.json` and `variants.md`.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[2] / "shared/data/instructions/t0_mixture.jsonl"
ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
TRUNCATIONS = {"head": ("head", 128), "head_tail": ("head_tail", 128), "head_tail256": ("head_tail", 256)}
SCORINGS = ("centroid", "dataset_centroids", "linear_probe", "knn10", "dataset_centroids+label_names")


def sample_rows(path: Path, per: int, seed: int = 0) -> list[dict]:
    by = collections.defaultdict(list)
    with path.open(encoding="utf-8") as f:  # not splitlines(): instructions hold U+2028
        for line in f:
            r = json.loads(line)
            by[r["dataset"]].append(r)
    rng = random.Random(seed)
    return [r for d in sorted(by) for r in rng.sample(by[d], min(per, len(by[d])))]


def cut(ids: list[int], how: str, n: int, cls: int, sep: int) -> list[int]:
    """`n` tokens with the encoder's [CLS]/[SEP]: the first ones, or the first and last halves."""
    room = n - 2
    if how == "head" or len(ids) <= room:
        ids = ids[:room]
    else:
        half = room // 2
        ids = ids[:half] + ids[-(room - half) :]
    return [cls, *ids, sep]


@torch.no_grad()
def embed_ids(model, batches: list[list[int]], size: int = 32) -> torch.Tensor:
    out = []
    for k in range(0, len(batches), size):
        b = batches[k : k + size]
        width = max(map(len, b))
        ids = torch.tensor([x + [0] * (width - len(x)) for x in b])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in b])
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, D)
        m = mask[..., None].float()
        out.append(F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)  # (N, D)


def label_scores(how: str, x_tr, y_tr, g_tr, x_te, n_labels: int, names: torch.Tensor) -> torch.Tensor:
    """(N_test, L) scores of every label for the held-out rows, by scoring rule `how`."""
    if how == "centroid":
        c = torch.stack(
            [x_tr[y_tr == k].mean(0) if (y_tr == k).any() else x_tr[0] * 0 for k in range(n_labels)]
        )
        return x_te @ F.normalize(c, dim=-1).T
    if how.startswith("dataset_centroids"):
        protos, owner = [], []
        for g in sorted(set(g_tr)):
            idx = torch.tensor([i for i, h in enumerate(g_tr) if h == g])
            protos.append(F.normalize(x_tr[idx].mean(0), dim=-1))
            owner.append(int(y_tr[idx[0]]))
        sims, owner = x_te @ torch.stack(protos).T, torch.tensor(owner)
        out = torch.full((len(x_te), n_labels), -2.0)
        for k in range(n_labels):
            if (owner == k).any():
                out[:, k] = sims[:, owner == k].max(1).values
        return out + 0.5 * (x_te @ names.T) if how.endswith("label_names") else out
    if how == "linear_probe":
        count = collections.Counter(g_tr)
        w = torch.tensor([1 / count[g] for g in g_tr])
        weight = torch.zeros(x_tr.shape[1], n_labels, requires_grad=True)
        bias = torch.zeros(n_labels, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = (F.cross_entropy(20 * x_tr @ weight + bias, y_tr, reduction="none") * w).sum() / w.sum()
            loss = loss + 1e-3 * (weight**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return (20 * x_te @ weight + bias).detach()
    if how == "knn10":
        top = (x_te @ x_tr.T).topk(10, dim=1).indices
        return F.one_hot(y_tr[top], n_labels).sum(1).float()
    raise ValueError(how)


def leave_one_dataset_out(x, y, groups, labels, names, how) -> dict:
    multi = {k for k in range(len(labels)) if len({g for g, t in zip(groups, y.tolist()) if t == k}) > 1}
    hit, n = collections.Counter(), collections.Counter()
    for g in sorted(set(groups)):
        te = [i for i, h in enumerate(groups) if h == g]
        if int(y[te[0]]) not in multi:
            continue
        tr = [i for i, h in enumerate(groups) if h != g]
        s = label_scores(how, x[tr], y[tr], [groups[i] for i in tr], x[te], len(labels), names)
        for i, p in zip(te, s.argmax(1).tolist(), strict=True):
            hit[labels[y[i]]] += p == int(y[i])
            n[labels[y[i]]] += 1
    return {"top1": sum(hit.values()) / sum(n.values()), "per_task": {k: hit[k] / n[k] for k in sorted(n)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-dataset", type=int, default=60)
    ap.add_argument("--encoder", default=ENCODER)
    ap.add_argument("--cache", help="file to keep the embeddings in (reused when the rows match)")
    ap.add_argument("--out", default="results/routing_holdout/variants")
    args = ap.parse_args()
    from lorachain.routing.encoders import embed, load_encoder

    rows = sample_rows(DATA, args.per_dataset)
    texts = [r["instruction"] for r in rows]
    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    enc, tok = load_encoder(args.encoder)
    t0 = time.perf_counter()
    cached = torch.load(args.cache) if args.cache and Path(args.cache).is_file() else {}
    from_cache = cached.get("key") == key
    if from_cache:
        vecs = cached["vecs"]
    else:
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        vecs = {
            name: embed_ids(enc, [cut(x, how, n, tok.cls_token_id, tok.sep_token_id) for x in ids])
            for name, (how, n) in TRUNCATIONS.items()
        }
        if args.cache:
            torch.save({"key": key, "vecs": vecs}, args.cache)
    embed_s = time.perf_counter() - t0
    labels = sorted({r["task"] for r in rows})
    y = torch.tensor([labels.index(r["task"]) for r in rows])
    groups = [r["dataset"] for r in rows]
    names = embed(enc, tok, [x.replace("_", " ") for x in labels], 32)
    results = []
    for trunc in TRUNCATIONS:
        for how in SCORINGS:
            r = leave_one_dataset_out(vecs[trunc], y, groups, labels, names, how)
            results.append({"truncation": trunc, "scoring": how, **r})
            print(f"{trunc:13s} {how:30s} top-1 {r['top1']:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": f"python benchmarks/selector_variants.py --per-dataset {args.per_dataset}",
        "rows": len(rows),
        "datasets": len(set(groups)),
        "labels": labels,
        "encoder": args.encoder,
        "embed_seconds": embed_s,
        "embeddings_from_cache": from_cache,
    }
    (out / "variants.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    short = [x[:10] for x in results[0]["per_task"]]
    lines = [
        f"Leave-one-data-set-out, frozen {args.encoder} embeddings, {len(rows)} rows "
        f"({args.per_dataset} per data set), label = task type. `{meta['command']}`",
        "",
        "| truncation | scoring | held-out top-1 | " + " | ".join(short) + " |",
        "|---|---|---|" + "---|" * len(short),
    ]
    for r in results:
        per = " | ".join(f"{v:.2f}" for v in r["per_task"].values())
        lines.append(f"| {r['truncation']} | {r['scoring']} | {r['top1']:.3f} | {per} |")
    (out / "variants.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/variants.json")


if __name__ == "__main__":
    main()
