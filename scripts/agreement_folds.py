"""The second-opinion rules (routing.eval.agreement) on a range of a nested run's outer folds.

A rule chosen looking at some outer folds is judged on the others only:

    python scripts/agreement_folds.py results/routing_holdout/nested_agreement_rounds_9 --from 3

reads `folds/nested_{first,second}_{i}.json` (kept by `route eval --nested`) and writes
`agreement_folds_<from>-<to>.json` beside them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorachain.io import write_json
from lorachain.routing.eval.agreement import agreement


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--first", default="encoder")
    ap.add_argument("--second", default="embedding")
    ap.add_argument("--from", dest="start", type=int, default=0, help="first outer fold (0-based)")
    ap.add_argument("--to", dest="stop", type=int, default=None, help="one past the last outer fold")
    ap.add_argument("--target", type=float, default=0.9)
    args = ap.parse_args()

    def folds(kind: str) -> list[dict]:
        paths = sorted(
            (args.run / "folds").glob(f"nested_{kind}_*.json"), key=lambda p: int(p.stem.rsplit("_", 1)[1])
        )
        return [json.loads(p.read_text()) for p in paths][args.start : args.stop]

    a, b = folds(args.first), folds(args.second)
    if not a or len(a) != len(b):
        raise SystemExit(f"{args.run}/folds: {len(a)} {args.first} and {len(b)} {args.second} folds in range")
    stop = args.start + len(a)
    result = {
        "run": str(args.run),
        "folds": [args.start, stop],
        "groups": [f["groups"] for f in a],
        f"{args.first} / {args.second}": agreement(a, b, args.target),
    }
    write_json(args.run / f"agreement_folds_{args.start}-{stop}.json", result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
