"""Prototypes of the embedding selector (routing.prototypes): a task scores its nearest data set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorachain.config import ConfigError
from lorachain.routing.confidence import fit_calibration
from lorachain.routing.config import SelectorConfig
from lorachain.routing.prototypes import prototype_index, prototype_sums, task_cosines, task_means


def test_prototype_index_per_task_and_per_dataset():
    tasks, sets = ["b", "a", "b", "b"], ["x", "y", "z", "x"]
    rows, owner = prototype_index(tasks, sets, ["a", "b"], "task")
    assert rows.tolist() == [1, 0, 1, 1] and owner.tolist() == [0, 1]
    rows, owner = prototype_index(tasks, sets, ["a", "b"], "dataset")  # (a,y) (b,x) (b,z)
    assert rows.tolist() == [1, 0, 2, 1] and owner.tolist() == [0, 1, 1]
    rows, owner = prototype_index(tasks, sets, ["a", "b"], "row")
    assert rows.tolist() == [0, 1, 2, 3] and owner.tolist() == [1, 0, 1, 1]


def test_a_task_of_two_distant_datasets_wins_an_instruction_near_one_of_them():
    """Task b's rows sit at two opposite corners; its mean points between them, so an instruction
    at one corner is nearer task a's centroid, but b's nearest data set is exactly there."""
    e = torch.eye(3)
    vecs = F.normalize(torch.stack([e[0] + e[2], e[0] - e[2], e[0] + 0.3 * e[1] + 0.6 * e[2]]), dim=-1)
    tasks, sets = ["b", "b", "a"], ["x", "z", "w"]
    q = F.normalize((e[0] + e[2])[None], dim=-1)
    by_task, by_set = (cosines(vecs, q, tasks, sets, by) for by in ("task", "dataset"))
    assert by_task.argmax(-1).item() == 0  # a: the blurred mean of b loses
    assert by_set.argmax(-1).item() == 1 and by_set[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    rows, owner = prototype_index(tasks, sets, ["a", "b"], "dataset")
    sums, counts = prototype_sums(vecs, rows, len(owner))
    means = task_means(sums, counts, owner, 2)
    assert torch.allclose(means[1], vecs[:2].mean(0)) and torch.allclose(means[0], vecs[2])


def test_a_task_without_rows_scores_minus_one():
    vecs = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    sums, counts = prototype_sums(vecs[:2], torch.tensor([0, 0]), 2)  # prototype 1 has no rows
    cos = task_cosines(vecs, sums, counts, torch.tensor([0, 1]), 2)
    assert cos[:, 1].tolist() == [-1.0] * 4 and torch.allclose(
        cos[:, 0], vecs @ F.normalize(vecs[:2].sum(0), dim=0)
    )


def test_unknown_prototypes_fail_in_one_line():
    with pytest.raises(ConfigError, match="selector.prototypes: expected one of"):
        SelectorConfig(prototypes="label")


def cosines(vecs, q, tasks, sets, by):
    rows, owner = prototype_index(tasks, sets, ["a", "b"], by)
    return task_cosines(q, *prototype_sums(vecs, rows, len(owner)), owner, 2)


def test_calibration_with_dataset_prototypes_holds_each_dataset_out_of_them():
    """Label 1: data sets A and B point one way, C the opposite; label 0 (D, E) lies between. Held
    out, A and B lose to label 0 against label 1's task mean but win against their twin's
    prototype; C stays wrong (its own prototype is held out with it), D and E are right."""
    g = torch.Generator().manual_seed(0)
    u, w, v = torch.tensor([0.0, 1, 0]), torch.tensor([0.0, -1, 0.2]), torch.tensor([0.0, 0.6, 0.8])
    centres = {"A": (1, u), "B": (1, u), "C": (1, w), "D": (0, v), "E": (0, v)}
    vecs, index, groups = [], [], []
    for grp, (lab, c) in centres.items():
        vecs.append(c + 0.02 * torch.randn(10, 3, generator=g))
        index += [lab] * 10
        groups += [grp] * 10
    vecs, index = F.normalize(torch.cat(vecs), dim=-1), torch.tensor(index)
    protos = prototype_index([str(i) for i in index.tolist()], groups, ["0", "1"], "dataset")
    by_task = fit_calibration(vecs, index, groups, 2, 0.05, "msp", 0.9)
    by_set = fit_calibration(vecs, index, groups, 2, 0.05, "msp", 0.9, protos)
    assert by_task["held_out_groups"] == by_set["held_out_groups"] == 5
    assert by_task["held_out"]["top1"] == pytest.approx(0.4) and by_set["held_out"]["top1"] == pytest.approx(
        0.8
    )


@pytest.fixture(scope="module")
def dataset_store(tmp_path_factory):
    from conftest import make_tokenizer, tiny_model, write_jsonl
    from test_nested import grouped_rows
    from test_selectors import route_cfg, tiny_encoder

    from lorachain.routing.train import route_train

    tmp = tmp_path_factory.mktemp("protos")
    data = write_jsonl(tmp / "rows.jsonl", grouped_rows())
    described = {"alpha": "Review Sentiment Review"}  # words no alpha row has
    enc = tiny_encoder(tmp / "tiny-bert")
    cfg = route_cfg(tmp, data, "embedding", enc, prototypes="dataset", descriptions=described)
    assert route_train(cfg, tiny_model("llama"), make_tokenizer(), progress=False) is not None
    bad = route_cfg(tmp / "bad", data, "embedding", enc, descriptions={"omega": "x"})
    with pytest.raises(ConfigError, match="selector.descriptions: no task 'omega' in the data"):
        route_train(bad, tiny_model("llama"), make_tokenizer(), progress=False)
    return tmp / "store"


def test_a_store_keeps_one_centroid_per_dataset_and_description_and_route_add_appends_one(
    dataset_store, tmp_path
):
    import shutil

    from conftest import make_tokenizer, tiny_model, write_jsonl
    from safetensors.torch import load_file

    from lorachain.routing.add import add_task
    from lorachain.serve.router import Router
    from lorachain.store import read_manifest

    m = read_manifest(dataset_store)
    assert m.selector["prototypes"] == "dataset" and m.selector["labels"] == ["alpha", "beta", "gamma"]
    assert m.selector["descriptions"] == {"alpha": "Review Sentiment Review"}
    t = load_file(str(dataset_store / "selector" / "centroids.safetensors"))
    assert t["owner"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0] and t["counts"].tolist()[-1] == 1
    assert t["described"].tolist() == [0] * 9 + [1]
    r = Router.from_store(dataset_store, model=tiny_model("llama"), tokenizer=make_tokenizer())
    sels = r.select(["red sky red", "blue sea blue", "Review Sentiment Review"])
    assert [s.ranked[0] for s in sels] == ["alpha", "beta", "alpha"]  # the last by its description
    store = shutil.copytree(dataset_store, tmp_path / "store")
    data = write_jsonl(tmp_path / "delta.jsonl", [{"instruction": f"purple {w} moon"} for w in "abcdef"])
    add_task(store, "delta", store / "adapters" / "gamma", data)
    t = load_file(str(store / "selector" / "centroids.safetensors"))
    assert t["owner"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 3] and t["counts"][-1].item() == 6
    assert t["described"].tolist() == [0] * 9 + [1, 0]
    r = Router.from_store(store, model=tiny_model("llama"), tokenizer=make_tokenizer())
    assert r.select(["purple a moon"])[0].ranked[0] == "delta"
