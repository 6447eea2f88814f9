"""`lorachain route train | eval | folds | add | human-rates`: argument parsing and printing only; the work is
in the routing modules they call (`routing`, and `routing.eval` for eval)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from lorachain.cli.args import add_precision
from lorachain.cli.serve import router_args, router_from_args


def _route_train(args: argparse.Namespace) -> int:
    from lorachain.config import load_config
    from lorachain.routing.config import RouteConfig
    from lorachain.routing.train import route_train

    cfg = load_config(args.config, args.overrides, cls=RouteConfig)
    for budget in (cfg.train, cfg.mixed_train, cfg.selector_train):
        if budget is not None and args.precision:
            budget.precision = args.precision
    manifest = route_train(cfg)
    if manifest is None:
        return 130
    print(f"store: {cfg.output_dir} ({len(manifest.adapters)} adapters)")
    if cfg.selector.evidence == "validation" and int(os.environ.get("RANK", "0")) == 0:
        _print_evidence(_evidence(cfg.output_dir))
    return 0


def _evidence(store: str) -> dict:
    """Measure a store's `selector.evidence` on its validation rows and write it to its manifest."""
    from lorachain.routing.eval.evidence import add_evidence
    from lorachain.serve.router import Router

    return add_evidence(store, Router.from_store(store, gate_margin=None, evidence=False))


def _print_evidence(got: dict) -> None:
    for task, p in got["per_task"].items():
        verdict = "routes" if p["routes"] else "answered by the mixed adapter"
        gap = f"{p['mean']:+.3f} [{p['low']:+.3f}, {p['high']:+.3f}]"
        print(f"evidence: {task}: {gap} nats/token over mixed on {p['n']} {got['split']} rows: {verdict}")


def _route_evidence(args: argparse.Namespace) -> int:
    """`route evidence STORE`: measure (or re-measure) an existing store's evidence."""
    _print_evidence(_evidence(args.store))
    return 0


def _route_holdout(args: argparse.Namespace) -> int:
    from lorachain.config import load_config
    from lorachain.routing.config import RouteConfig
    from lorachain.routing.eval.holdout import holdout_eval

    store = Path(args.store)
    path = store / "route_config.json" if store.is_dir() else store
    cfg = load_config(str(path), args.set, cls=RouteConfig)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    out = args.out or str((store if store.is_dir() else Path("results")) / f"holdout_{args.holdout_by}")
    command = "lorachain " + shlex.join(sys.argv[1:])  # quoted: it can be pasted back
    if args.nested:
        from lorachain.routing.eval.nested import nested_eval, nested_markdown

        grids: dict[str, list[str]] = {}
        for spec in args.grid:  # KIND:KEY=V1,V2
            kind, _, axis = spec.partition(":")
            grids.setdefault(kind, []).append(axis)
        result = nested_eval(
            cfg,
            args.holdout_by,
            out,
            kinds,
            args.label,
            args.per_group,
            command,
            grids or None,
            args.target_precision,
            args.max_folds,
            args.inner_folds,
            args.embedding_cache,
            args.folds,
        )
        print(nested_markdown(result))
        return 0
    result = holdout_eval(
        cfg,
        args.holdout_by,
        out,
        kinds,
        args.label,
        args.per_group,
        args.folds,
        command,
        args.max_folds,
        not args.skip_in_distribution,
    )
    from lorachain.routing.eval.holdout import holdout_markdown

    print(holdout_markdown(result))
    return 0


def _route_compare(args: argparse.Namespace) -> int:
    """`route eval STORE --held-out FILE | --lockbox DIR --half A`: the answer-quality table."""
    from lorachain.routing.eval.compare import compare, markdown

    if args.lockbox:
        from lorachain.routing.eval.lockbox import open_half

        command = shlex.join(
            ["lorachain", "route", "eval", args.store, "--lockbox", args.lockbox, "--half", args.half]
        )
        rows = open_half(args.lockbox, args.half, args.reason or "", command, args.after_a_failed)
        source = f"lockbox half {args.half} ({args.lockbox})"
    else:
        from lorachain.data import read_rows

        rows, source = [r for _, r in read_rows(args.held_out)], args.held_out
        if args.max_per_task:
            from lorachain.routing.eval.fold_stores import first_per_task

            rows = first_per_task(rows, args.max_per_task)
            source += f" (the first {args.max_per_task} rows of each task type)"
    store = Path(args.store)
    result = compare(
        router_from_args(args),
        rows,
        args.cache or store / "answers",
        args.out or store / "compare",
        args.gate_margin,
        not args.no_answers,
        source,
        args.max_new_tokens,
    )
    print(markdown(result))
    return 0


def _route_eval(args: argparse.Namespace) -> int:
    from lorachain.routing.eval.store import route_eval

    if args.holdout_by:
        return _route_holdout(args)
    if args.held_out or args.lockbox:
        return _route_compare(args)
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    rows, source = None, "the store's test split"
    if args.unseen:
        from lorachain.routing.eval.unseen import unseen_rows

        names = [x for x in (args.datasets or "").split(",") if x] or None
        rows = unseen_rows(args.store, args.rows, names, args.max_per_task)
        source = "data sets the store never saw"
    result = route_eval(
        router_from_args(args),
        args.store,
        args.out,
        args.max_per_task,
        modes,
        args.max_new_tokens,
        args.judge_url,
        args.judge_model,
        rows,
        source,
    )
    from lorachain.routing.eval.store import report_markdown

    print(report_markdown(result))
    return 0


def _route_folds(args: argparse.Namespace) -> int:
    from lorachain.config import load_config
    from lorachain.io import write_json
    from lorachain.routing.config import RouteConfig
    from lorachain.routing.eval import fold_stores

    cfg = load_config(args.config, args.overrides, cls=RouteConfig)
    out = Path(args.out)
    if args.estimate:
        got = fold_stores.estimate_store(cfg, out / "_estimate", (2, 2 + args.estimate))
        got |= {"folds": args.folds, "core_hours_all_folds": got["core_hours_per_store"] * args.folds}
        write_json(out / "estimate.json", got)
        print(json.dumps(got, indent=2))
        return 0
    if args.in_distribution:
        from lorachain.routing.eval.compare import markdown
        from lorachain.serve.router import Router

        pooled = fold_stores.compare_in_distribution(
            out,
            args.folds,
            args.gate_margin,
            args.max_per_task,
            not args.no_answers,
            args.max_new_tokens,
            make_router=lambda store: Router.from_store(store, max_new_tokens=args.max_new_tokens),
        )
        print(markdown(pooled))
        return 0
    if args.compare:
        from lorachain.routing.eval.compare import markdown
        from lorachain.routing.eval.variants import variant_names
        from lorachain.serve.router import Router

        variants = variant_names(args.variants)
        pooled = fold_stores.compare_folds(
            out,
            args.folds,
            args.max_per_task,
            not args.no_answers,
            max_new_tokens=args.max_new_tokens,
            make_router=lambda store: Router.from_store(store, max_new_tokens=args.max_new_tokens),
            variants=variants,
        )
        print(markdown(pooled))
        print(f"gate margin chosen on reference perplexity over the folds: {pooled['gate_margin']}")
        return 0
    for k, held in enumerate(fold_stores.fold_plan(cfg, args.folds)):
        print(f"fold{k}: holds out {', '.join(held)}")
    if args.plan:
        return 0
    return 0 if fold_stores.build_folds(cfg, out, args.folds) is not None else 130


def _folds_parser(rsub) -> None:
    rf = rsub.add_parser(
        "folds", help="fold stores blind to some data sets; --compare scores answers, --estimate times them"
    )
    rf.add_argument("config")
    rf.add_argument("overrides", nargs="*")
    rf.add_argument("--out", default="stores/folds", help="the fold stores' folder")
    rf.add_argument("--folds", type=int, default=3)
    rf.add_argument(
        "--plan", action="store_true", help="print which data sets each fold holds out, train nothing"
    )
    rf.add_argument(
        "--estimate", type=int, default=0, metavar="N", help="time N optimizer steps; core-hours per store"
    )
    rf.add_argument("--compare", action="store_true", help="score the trained fold stores (answer cache)")
    rf.add_argument("--max-per-task", type=int, default=20, help="compare: held-out rows per task type")
    rf.add_argument("--max-new-tokens", type=int, default=32)
    rf.add_argument(
        "--in-distribution",
        action="store_true",
        help="score each fold store on its own test split (--max-per-task rows per type) with the "
        "gate at --gate-margin: does that margin keep routing's gain where the store was trained?",
    )
    rf.add_argument("--gate-margin", type=float, default=0.2, help="in-distribution: the gate's margin")
    rf.add_argument("--no-answers", action="store_true", help="compare: reference perplexity only")
    rf.add_argument(
        "--variants",
        default="other,augmented",
        help="compare: selector variants fitted on each fold store and compared as options "
        "(other, augmented, other_augmented; none)",
    )
    rf.set_defaults(func=_route_folds)
    rv = rsub.add_parser(
        "evidence",
        help="which task adapters beat the mixed adapter on their own validation rows "
        "(selector.evidence: written to the store's manifest)",
    )
    rv.add_argument("store")
    rv.set_defaults(func=_route_evidence)


def _route_add(args: argparse.Namespace) -> int:
    from lorachain.routing.add import add_task

    m = add_task(args.store, args.task, args.adapter_dir, args.data, args.instruction_field, args.input_field)
    print(f"store: {args.store} ({len(m.labels)} tasks; added {args.task!r}, selector not retrained)")
    return 0


def _human_rates(args: argparse.Namespace) -> int:
    from lorachain.routing.eval.judge import human_rates

    print(json.dumps(human_rates(args.sheet), indent=2))
    return 0


def add_parser(sub) -> None:
    """`lorachain route train | eval | add | human-rates` under the top-level subparsers `sub`."""
    r = sub.add_parser("route", help="task routing: train a store, evaluate it, rate human sheets")
    rsub = r.add_subparsers(dest="route_cmd", required=True)
    rt = rsub.add_parser("train", help="train task adapters, the selector and the mixed adapter")
    rt.add_argument("config")
    rt.add_argument("overrides", nargs="*")
    add_precision(rt)
    rt.set_defaults(func=_route_train)
    re_ = rsub.add_parser("eval", help="perplexity, selector accuracy, answer quality on the test split")
    router_args(re_, 32)
    re_.add_argument("--out", default=None, help="report folder (default STORE/eval)")
    re_.add_argument(
        "--max-per-task", type=int, default=None, help="test rows per task (--held-out: the first N of each)"
    )
    re_.add_argument("--modes", default="score,generate")
    re_.add_argument(
        "--unseen",
        action="store_true",
        help="score rows of data sets the store never saw (default: its data.exclude_datasets), not "
        "its test split",
    )
    re_.add_argument(
        "--rows", default=None, help="unseen: the instruction file (default: the store's data file)"
    )
    re_.add_argument("--datasets", default=None, help="unseen: data sets, comma-separated")
    re_.add_argument(
        "--judge-url",
        default=os.environ.get("LORACHAIN_JUDGE_URL"),
        help="OpenAI-compatible base URL for 1-6 helpfulness ratings (optional)",
    )
    re_.add_argument("--judge-model", default=os.environ.get("LORACHAIN_JUDGE_MODEL", "gpt-3.5-turbo"))
    re_.add_argument(
        "--holdout-by",
        default=None,
        help="leave-one-group-out selector accuracy by this field (e.g. dataset, template); STORE may "
        "then be a route YAML config instead of a store",
    )
    re_.add_argument("--label", default="task", help="holdout: the field the selector predicts")
    re_.add_argument("--kinds", default="embedding", help="holdout: selector kinds, comma-separated")
    re_.add_argument("--per-group", type=int, default=60, help="holdout: rows per group (seeded)")
    re_.add_argument(
        "--folds",
        choices=["one", "rounds"],
        default="one",
        help="holdout: one group per fold, or one group of every label per fold",
    )
    re_.add_argument("--max-folds", type=int, default=None, help="holdout: only the first N folds")
    re_.add_argument(
        "--skip-in-distribution", action="store_true", help="holdout: no in-distribution fit (budget)"
    )
    re_.add_argument(
        "--set", nargs="+", action="extend", default=[], help="dotted config overrides (repeatable)"
    )
    re_.add_argument(
        "--nested",
        action="store_true",
        help="holdout: settings, temperature and thresholds chosen on inner folds only (unbiased)",
    )
    re_.add_argument(
        "--grid",
        nargs="*",
        default=[],
        help="nested: KIND:KEY=V1,V2 axes of the settings grid (default per kind: routing.eval.nested.GRIDS)",
    )
    re_.add_argument(
        "--target-precision", type=float, default=0.9, help="nested: precision the routing threshold aims at"
    )
    re_.add_argument("--inner-folds", type=int, default=None, help="nested: at most N inner folds (budget)")
    re_.add_argument(
        "--embedding-cache",
        default=None,
        help="nested: a file keeping the embedding kind's embeddings between runs",
    )
    rc = re_.add_argument_group("answer quality on held-out rows (issue 43): every option by lookup")
    rc.add_argument(
        "--held-out", default=None, help="your own rows (instruction, output, task; JSONL/JSON/CSV/Parquet)"
    )
    rc.add_argument("--lockbox", default=None, help="a sealed lockbox folder (data/lockbox); needs --half")
    rc.add_argument(
        "--half", choices=["A", "B"], default="A", help="lockbox: which half (B: --after-a-failed)"
    )
    rc.add_argument("--reason", default=None, help="lockbox: why it is opened (logged in its seal)")
    rc.add_argument("--after-a-failed", action="store_true", help="lockbox: allow half B (A failed once)")
    rc.add_argument("--cache", default=None, help="the answer cache folder (default STORE/answers)")
    rc.add_argument("--no-answers", action="store_true", help="reference perplexity only, no generation")
    re_.set_defaults(func=_route_eval)
    _folds_parser(rsub)
    ra = rsub.add_parser(
        "add", help="add a task adapter to a store with an embedding selector (no retraining)"
    )
    ra.add_argument("store")
    ra.add_argument("task", help="the new task label")
    ra.add_argument(
        "adapter_dir", help="a PEFT adapter folder (or a lorachain run folder) on the store's base"
    )
    ra.add_argument("data", help="instructions of the task (JSONL, JSON, CSV): their centroid routes to it")
    ra.add_argument("--instruction-field", default="instruction")
    ra.add_argument("--input-field", default=None, help="optional context appended to the instruction")
    ra.set_defaults(func=_route_add)
    rh = rsub.add_parser("human-rates", help="pass/excellent/fail rates from a filled human_eval.csv")
    rh.add_argument("sheet")
    rh.set_defaults(func=_human_rates)
