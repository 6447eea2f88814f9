"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases and MLflow behind one writer.

Rank 0 opens them (`open_trackers`); the loop only calls `add_scalar(name, value, step)` and
`close()`. A resumed run continues the same tracker runs: their ids are kept in the run folder
(trackers.json), and a step a tracker already holds (logged before the checkpoint, or after it by
the run that was stopped, and replayed to the same numbers) is not sent again. TensorBoard hides
the events past the checkpoint instead (`purge_step`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from lorachain.config import ConfigError, RunConfig
from lorachain.io import write_text

STATE = "trackers.json"  # in the run folder: {"wandb": {"id", "step"}, "mlflow": {"run_id", "step"}}
EXTRA = "pip install 'lorachain[trackers]'"


def check_installed(names: list[str]) -> None:
    """Refuse, in one line naming the extra, a tracker that is not installed (imports nothing)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.report_to: {name} is not installed; {EXTRA}")


class Trackers:
    """One writer fanning out to each tracker of `train.report_to`."""

    def __init__(self, writers: list) -> None:
        self.writers = writers

    def add_scalar(self, name: str, value: float, step: int) -> None:
        for writer in self.writers:
            writer.add_scalar(name, float(value), step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


class StepRows:
    """Collects one step's scalars and sends them as one row when the step moves on (or at close).

    Steps up to `done` are skipped: the tracker holds them already. After each row, `done` is
    recorded in the run folder's trackers.json under `key`, so a resume knows where the tracker is.
    """

    def __init__(self, out: Path, key: str, send: Callable, finish: Callable, done: int) -> None:
        self.out, self.key, self.send, self.finish, self.done = out, key, send, finish, done
        self.step, self.row = -1, {}

    def add_scalar(self, name: str, value: float, step: int) -> None:
        if step <= self.done:
            return
        if step != self.step:
            self.flush()
            self.step = step
        self.row[name] = value

    def flush(self) -> None:
        if self.row:
            self.send(self.row, self.step)
            self.done, self.row = self.step, {}
            save_state(self.out, self.key, step=self.done)

    def close(self) -> None:
        self.flush()
        self.finish()


def load_state(out: Path) -> dict:
    path = out / STATE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_state(out: Path, key: str, **values) -> None:
    state = load_state(out)
    state[key] = {**state.get(key, {}), **values}
    write_text(out / STATE, json.dumps(state, indent=1, sort_keys=True) + "\n")


def open_trackers(cfg: RunConfig, out: Path, start: int) -> Trackers:
    """The trackers of `cfg.train.report_to` for a run at step `start` (0, or the checkpoint's)."""
    check_installed(cfg.train.report_to)
    opener = {"tensorboard": tensorboard, "wandb": wandb_run, "mlflow": mlflow_run}
    return Trackers([opener[name](cfg, out, start) for name in cfg.train.report_to])


def tensorboard(cfg: RunConfig, out: Path, start: int):
    """<run>/tb; on resume, events of steps past the checkpoint are hidden (the checkpoint's kept)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"), purge_step=start + 1 if start else None)


def wandb_run(cfg: RunConfig, out: Path, start: int) -> StepRows:
    """A wandb run whose id is kept in the run folder, resumed with resume="allow".

    Project from WANDB_PROJECT (default "lorachain"), files under WANDB_DIR (default the run
    folder); WANDB_MODE=offline writes locally, for `wandb sync` later.
    """
    import wandb

    state = load_state(out).get("wandb", {})
    run_id = state.get("id") or secrets.token_hex(4)
    save_state(out, "wandb", id=run_id)
    run = wandb.init(
        project=wandb.env.get_project("lorachain"),
        dir=None if wandb.env.get_dir() else str(out),
        id=run_id,
        name=out.resolve().name,
        resume="allow",
        reinit="create_new",  # leaves a run the caller has open alone
        config=cfg.to_dict(),
    )
    done = max(start, state.get("step", 0), run.step - 1)  # run.step: the next step, online
    return StepRows(out, "wandb", lambda row, step: run.log(row, step=step), run.finish, done)


def mlflow_run(cfg: RunConfig, out: Path, start: int) -> StepRows:
    """An MLflow run whose id is kept in the run folder, continued on resume.

    Tracking URI from MLFLOW_TRACKING_URI, default a file store in <run>/mlruns (allowed through
    MLFLOW_ALLOW_FILE_STORE, which MLflow 3 asks for); experiment from MLFLOW_EXPERIMENT_NAME,
    default "lorachain". The config is logged as the artifact config.json.
    """
    from mlflow.entities import Metric
    from mlflow.environment_variables import MLFLOW_EXPERIMENT_NAME, MLFLOW_TRACKING_URI
    from mlflow.tracking import MlflowClient

    uri = MLFLOW_TRACKING_URI.get() or (out / "mlruns").resolve().as_uri()
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    state = load_state(out).get("mlflow", {})
    run_id = state.get("run_id")
    if run_id and _exists(client, run_id):
        client.update_run(run_id, status="RUNNING")
    else:  # a new run (or one started by an earlier run into another store)
        name = MLFLOW_EXPERIMENT_NAME.get() or "lorachain"
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp else client.create_experiment(name)
        run_id, state = client.create_run(exp_id, run_name=out.resolve().name).info.run_id, {}
        client.log_dict(run_id, cfg.to_dict(), "config.json")
        save_state(out, "mlflow", run_id=run_id, step=0)

    def send(row: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in row.items()])

    finish = lambda: client.set_terminated(run_id, "FINISHED")  # noqa: E731
    return StepRows(out, "mlflow", send, finish, max(start, state.get("step", 0)))


def _exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
    except MlflowException:
        return False
    return True
