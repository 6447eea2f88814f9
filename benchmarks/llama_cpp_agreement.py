"""lorachain's GGUF export in a real llama.cpp: the same greedy tokens as lorachain?

One command: `python benchmarks/llama_cpp_agreement.py [--store STORE]`. It installs nothing: without
`llama_cpp` (llama-cpp-python) it prints one line and exits 0. It exports a store (`--store`, or
four random r=8 adapters on SmolLM2-135M-Instruct) with `lorachain export gguf`, then for every
adapter and prompt decodes 16 greedy tokens from the same prompt token ids in lorachain (PyTorch +
PEFT) and in llama.cpp (base GGUF + adapter GGUF), with the F32 base and with the original Q4_1
base. Writes `benchmarks/results/llama_cpp.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "### Instruction:\nIs this review positive or negative? The food was cold.\n\n### Response:\n",
    "### Instruction:\nWhat is the capital of France?\n\n### Response:\n",
    "### Instruction:\nWrite a short poem about the sea.\n\n### Response:\n",
    "### Instruction:\nTranslate to French: Good morning.\n\n### Response:\n",
]
NEW = 16


def lorachain_tokens(model, prompts: list[list[int]]) -> list[list[int]]:
    import torch

    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False)
            out.append(y[0, len(ids) :].tolist())
    return out


def llama_tokens(
    base: Path, adapter: Path | None, prompts: list[list[int]], eos: set[int]
) -> list[list[int]]:
    """Greedy tokens from llama.cpp, stopped by the same end-of-sequence ids as lorachain's generate."""
    from llama_cpp import Llama

    kwargs = {"lora_path": str(adapter)} if adapter else {}
    llm = Llama(str(base), n_ctx=512, n_threads=2, verbose=False, **kwargs)
    out = []
    for ids in prompts:
        toks = []
        for t in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            if len(toks) == NEW:
                break
            toks.append(t)
            if t in eos:
                break
        out.append(toks)
    del llm
    return out


def logit_gap(model, base: Path, adapter: Path | None, ids: list[int]) -> float:
    """Largest |logit difference| between lorachain and llama.cpp over every position of `ids`."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].float().numpy()  # (T, V)
    kwargs = {"lora_path": str(adapter)} if adapter else {}
    llm = Llama(str(base), n_ctx=512, n_threads=2, verbose=False, logits_all=True, **kwargs)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    del llm
    return float(np.abs(ours - theirs[:, : ours.shape[1]]).max())


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Exact sequences equal, and the mean length of the common prefix."""
    prefix = []
    for x, y in zip(a, b, strict=True):
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix.append(n)
    return {"equal": sum(x == y for x, y in zip(a, b, strict=True)), "of": len(a), "prefix": prefix}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None)
    ap.add_argument("--out", default="benchmarks/results/llama_cpp.json")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("skipped: llama_cpp is not installed (pip install llama-cpp-python; see README)")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import PeftModel
    from real_engine import build_store

    from lorachain.config import ModelConfig
    from lorachain.export.gguf import export_gguf
    from lorachain.models import load_model, load_tokenizer, resolve_path
    from lorachain.store import SELECTOR, read_manifest

    tmp = Path(tempfile.mkdtemp(prefix="llama_cpp_"))
    store = Path(args.store) if args.store else build_store(tmp / "store")
    t = time.time()
    export_gguf(store, tmp / "gguf")
    export_s = time.time() - t
    export_gguf(store, tmp / "gguf_q", keep_quantized=True)
    manifest = read_manifest(store)
    cfg = ModelConfig(manifest.base_model["name_or_path"], gguf_file=manifest.base_model.get("gguf_file"))
    tok = load_tokenizer(resolve_path(cfg))
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    stop = load_model(cfg).generation_config.eos_token_id
    eos = {tok.eos_token_id, *(stop if isinstance(stop, list) else [stop])} - {None}
    rows = []
    for name, entry in [("base", None), *((n, a) for n, a in manifest.adapters.items() if n != SELECTOR)]:
        model = load_model(cfg)
        if entry is not None:
            model = PeftModel.from_pretrained(model, str(store / entry["path"])).eval()
        ours = lorachain_tokens(model, prompts)
        gguf_name = None if entry is None else ("mixed" if name == "_mixed" else name) + ".gguf"
        for base_kind, folder in (("f32", tmp / "gguf"), ("q4_1", tmp / "gguf_q")):
            adapter = folder / gguf_name if gguf_name else None
            theirs = llama_tokens(folder / "base.gguf", adapter, prompts, eos)
            gap = logit_gap(model, folder / "base.gguf", adapter, prompts[0])
            rows.append({"adapter": name, "base": base_kind, "max_logit_gap": gap, **agreement(ours, theirs)})
            r = rows[-1]
            print(f"{name:14s} {base_kind:5s} {r['equal']}/{r['of']} equal, common prefixes {r['prefix']}, "
                  f"max |logit gap| on prompt 1 {gap:.2e}")  # fmt: skip

    def rate(kind: str) -> float:
        mine = [r for r in rows if r["base"] == kind]
        return sum(r["equal"] for r in mine) / sum(r["of"] for r in mine)

    result = {
        "engine": f"llama-cpp-python {llama_cpp.__version__}",
        "new_tokens": NEW,
        "export_seconds": export_s,
        "match_rate_f32": rate("f32"),
        "match_rate_q4_1": rate("q4_1"),
        "rows": rows,
    }
    print(f"F32 base: {rate('f32'):.0%} of sequences equal; Q4_1 base: {rate('q4_1'):.0%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
