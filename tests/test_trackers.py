"""`train.report_to`: TensorBoard, wandb (offline) and MLflow (a local file store) get the loop's
scalars at the right steps; a resumed run, after a kill too, continues the same tracker runs with
each step once; only rank 0 logs; a tracker that is unknown or not installed is refused in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_config, tiny_model

from lorachain.config import ConfigError, RunConfig, from_dict
from lorachain.training.loop import train

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

ALL = ["tensorboard", "wandb", "mlflow"]


@pytest.fixture
def tracker_env(monkeypatch):
    """wandb offline and quiet; MLflow and wandb at their defaults (files under the run folder)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.setenv(name, "")  # recorded as unset, so the library's setdefault is undone too
        monkeypatch.delenv(name)


def cfg_for(tmp_path, toy_data, name: str = "run", **train_over) -> RunConfig:
    over = {"epochs": 2, "batch_size": 8, "save_every": 3, "seed": 0, "report_to": ALL} | train_over
    return from_dict(RunConfig, run_config(tmp_path, toy_data, output_dir=str(tmp_path / name), train=over))


def wandb_history(run: Path) -> tuple[set[str], list[dict]]:
    """The run ids and history rows of every offline wandb run under `run`, in the order written."""
    from wandb.proto import wandb_internal_pb2 as pb

    ids, rows = set(), []
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):  # named by start time
        for rec in wandb_records(path.read_bytes(), pb.Record):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                ids.add(rec.run.run_id)
            elif kind == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                )
    return ids, rows


def wandb_records(data: bytes, record):
    """wandb's transaction log: LevelDB log framing (32 KiB blocks, 7-byte headers) after a 7-byte
    file header, each record a protobuf `Record`."""
    pos, part = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or kind == 0:  # block trailer / padding
            pos += left
            continue
        part += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # full, or the last piece
            rec = record()
            rec.ParseFromString(part)
            part = b""
            yield rec


def mlflow_runs(run: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("lorachain")
    return client, client.search_runs([exp.experiment_id])


def tb_scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def check_trackers(run: Path, steps: list[int]) -> None:
    """Each tracker holds train/loss once per step, as metrics.jsonl has it, in one tracker run."""
    want = losses(run)
    assert sorted(want) == steps
    state = json.loads((run / "trackers.json").read_text())
    ids, rows = wandb_history(run)
    assert ids == {state["wandb"]["id"]}
    logged = [r["_step"] for r in rows]
    assert logged == steps  # strictly increasing, each step once, over the stopped and resumed runs
    assert all(r["train/loss"] == pytest.approx(want[r["_step"]], rel=1e-6) for r in rows)
    client, runs = mlflow_runs(run)
    assert [r.info.run_id for r in runs] == [state["mlflow"]["run_id"]]
    assert runs[0].info.status == "FINISHED"
    hist = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert [m.step for m in hist] == steps
    assert [m.value for m in hist] == pytest.approx([want[s] for s in steps], rel=1e-6)
    tb = tb_scalars(run, "train/loss")
    assert [s for s, _ in tb] == steps
    assert [v for _, v in tb] == pytest.approx([want[s] for s in steps], rel=1e-6)


def test_scalars_land_at_their_steps(tmp_path, toy_data, tokenizer, tracker_env):
    run = tmp_path / "run"
    cfg = cfg_for(tmp_path, toy_data, eval_every=4)
    summary = train(cfg, tiny_model("llama"), tokenizer, progress=False).summary
    check_trackers(run, list(range(1, 13)))
    knot = summary["links"][0]["end_step"]
    _, rows = wandb_history(run)
    knots = {r["_step"]: r["chain/knot"] for r in rows if "chain/knot" in r}
    assert knots == {knot: 1, 12: 1}  # the link after the knot (the end ties the last one)
    evals = {r["_step"]: r["eval/eval_loss"] for r in rows if "eval/eval_loss" in r}
    jsonl = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    want = {r["step"]: r["eval"]["eval_loss"] for r in jsonl if "eval" in r and r["step"] in (4, 8)}
    assert sorted(evals) == [4, 8] and evals == pytest.approx(
        want, rel=1e-6
    )  # train.eval_every (not the end's)
    assert {s for s, _ in tb_scalars(run, "train/lr")} == set(range(1, 13))
    assert list(run.glob("wandb/offline-run-*")) and (run / "mlruns").is_dir()


def test_resume_continues_the_same_tracker_runs(tmp_path, toy_data, tokenizer, tracker_env):
    """Stopped at 4; run on to 8 and killed there (the checkpoint at 4 is the last one): the resume
    replays 5..8 to the same numbers, which the trackers already hold, and goes on to 12."""
    run, cfg = tmp_path / "run", cfg_for(tmp_path, toy_data, save_every=50)
    assert train(cfg, tiny_model("llama"), tokenizer, stop_after=4, progress=False).summary["step"] == 4
    shutil.copy(run / "checkpoint.pt", tmp_path / "ck4.pt")
    assert train(cfg, tiny_model("llama"), tokenizer, stop_after=8, progress=False).summary["step"] == 8
    shutil.copy(tmp_path / "ck4.pt", run / "checkpoint.pt")  # as if killed after step 8
    assert train(cfg, tiny_model("llama"), tokenizer, progress=False).summary["status"] == "finished"
    assert len(list(run.glob("wandb/offline-run-*"))) == 3  # one offline log per process, one run id
    check_trackers(run, list(range(1, 13)))


def test_unknown_or_missing_tracker_is_refused(tmp_path, toy_data, tracker_env, monkeypatch):
    with pytest.raises(ConfigError, match=r"^train.report_to: expected some of .*got 'neptune'$"):
        cfg_for(tmp_path, toy_data, report_to=["tensorboard", "neptune"])
    with pytest.raises(ConfigError, match="train.report_to: names a tracker twice"):
        cfg_for(tmp_path, toy_data, report_to=["wandb", "wandb"])
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = cfg_for(tmp_path, toy_data)  # model.name_or_path "tiny-llama" does not exist: nothing loads
    with pytest.raises(ConfigError) as err:
        train(cfg, progress=False)
    assert str(err.value) == "train.report_to: wandb is not installed; pip install 'lorachain[trackers]'"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json"]


def test_no_trackers_and_the_default(tmp_path, toy_data, tokenizer, tracker_env):
    train(
        cfg_for(tmp_path, toy_data, "none", report_to=[], epochs=1),
        tiny_model("llama"),
        tokenizer,
        progress=False,
    )
    assert not {"tb", "wandb", "mlruns", "trackers.json"} & {p.name for p in (tmp_path / "none").iterdir()}
    default = from_dict(RunConfig, run_config(tmp_path, toy_data))
    assert default.train.report_to == ["tensorboard"]  # as before report_to existed
    assert cfg_for(tmp_path, toy_data, report_to="wandb").train.report_to == ["wandb"]  # as Trainer's
    assert cfg_for(tmp_path, toy_data, report_to="none").train.report_to == []


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU")
def test_only_rank_zero_logs(tmp_path, toy_data, tiny_dir, monkeypatch):
    """ddp on 2 processes: one wandb run, one MLflow run, one TensorBoard file, each step once."""
    data = run_config(tmp_path, toy_data, output_dir=str(tmp_path / "two"))
    data["model"]["name_or_path"] = str(tiny_dir)
    data["train"] |= {"parallel": "ddp", "report_to": ALL, "epochs": 1}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(data))
    script = str(Path(__file__).parent / "parallel_run.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env |= {
        "OMP_NUM_THREADS": "1",
        "LORACHAIN_DIST_TIMEOUT": "60",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "two.yaml")], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "two"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read the store here
    assert len(list(run.glob("wandb/offline-run-*"))) == 1
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    check_trackers(run, list(range(1, 7)))
