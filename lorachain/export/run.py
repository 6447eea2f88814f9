"""`lorachain export`: a finished run folder -> one PEFT adapter, and optionally a merged model."""

from __future__ import annotations

from pathlib import Path

from lorachain.chain.export import is_dora, load_chain, write_adapter, write_merged
from lorachain.config import ConfigError, RunConfig, from_dict


def export_run(
    run_dir: str | Path, out: str | Path | None = None, merged: str | Path | None = None
) -> list[Path]:
    """Write the chain of `run_dir` as one adapter (and the merged model; a DoRA chain: only that);
    return the folders."""
    import json

    run_dir = Path(run_dir)
    knots, head, meta = load_chain(run_dir / "chain.safetensors")
    if is_dora(knots) and not merged:
        raise ConfigError(f"{run_dir}: a DoRA chain exports as a merged model only; pass --merged OUT")
    written = [] if is_dora(knots) else [write_adapter(out or run_dir / "adapter", knots, head, meta)]
    if merged:
        from lorachain.models import load_model, load_tokenizer, resolve_path

        cfg = from_dict(RunConfig, json.loads((run_dir / "config.json").read_text()))
        labels = len(cfg.data.label_words) if cfg.data.label_words else None
        base = load_model(cfg.model, num_labels=labels)
        tokenizer = load_tokenizer(resolve_path(cfg.model))
        written.append(write_merged(merged, base, knots, head, tokenizer))
    return written
