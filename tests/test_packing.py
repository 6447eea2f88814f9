"""Packing: rows share a sequence but never attend to one another; the loss and the run are unchanged."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import run_config, tiny_model
from safetensors.torch import load_file

from lorachain.config import ConfigError, RunConfig, from_dict
from lorachain.data import Example, collate, pack
from lorachain.data.packing import pack_rows
from lorachain.models import check_packing
from lorachain.training import train
from lorachain.training.step import summed_loss

ROWS = [
    Example([2, 10, 11, 12, 13], [-100, -100, -100, 12, 13]),
    Example([2, 20, 21, 22, 23, 24, 25], [-100, -100, 21, 22, 23, 24, 25]),
    Example([2, 14, 15], [-100, 14, 15]),
    Example([2, 30, 31, 32, 33, 34, 35, 36, 37], [-100, -100, -100, -100, 33, 34, 35, 36, 37]),
]


def test_pack_layout():
    assert pack_rows([5, 7, 3, 9], 12) == [[0, 1], [2, 3]]
    b = pack(ROWS, 0, 12)
    assert b.keys() == {"input_ids", "position_ids", "labels"}
    assert b["input_ids"].shape == (2, 12)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]
    assert b["position_ids"][1].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    # the same target tokens as the padded batch; a row's first token is never a target
    assert (b["labels"] != -100).sum() == (collate(ROWS, 0, False)["labels"] != -100).sum()
    assert b["labels"][0, 5] == -100 and b["labels"][1, 3] == -100


def row_losses(model, batch, rows: list[list[int]]) -> list[float]:
    """Summed cross-entropy of each row, rows given as (sequence, start, end) in the batch."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    out = []
    for p, a, z in rows:
        lab = batch["labels"][p, a + 1 : z]
        out.append(float(F.cross_entropy(logits[p, a : z - 1], lab, ignore_index=-100, reduction="sum")))
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_no_packed_row_attends_to_another(family, attn):
    model = tiny_model(family)
    model.set_attn_implementation(attn)
    check_packing(model)
    packed = pack(ROWS, 0, 12)
    alone = [
        row_losses(model, {k: v[:1] for k, v in collate([e], 0, False).items()}, [(0, 0, len(e.input_ids))])[
            0
        ]
        for e in ROWS
    ]
    spans = [(0, 0, 5), (0, 5, 12), (1, 0, 3), (1, 3, 12)]
    for got, want in zip(row_losses(model, packed, spans), alone, strict=True):
        assert want > 0
        assert abs(got - want) <= 1e-5 * want
    # the step's loss (sum over target tokens): packed == padded
    torch.testing.assert_close(
        summed_loss(model, packed, False),
        summed_loss(model, collate(ROWS, 0, False), False),
        rtol=1e-5,
        atol=0,
    )


@pytest.mark.parametrize("family", ["opt", "bloom"])
def test_packing_is_refused_where_rows_would_mix(family):
    with pytest.raises(
        ConfigError, match=rf"^data.packing: {family} attention does not keep packed rows apart"
    ):
        check_packing(tiny_model(family))


def test_packing_is_refused_for_a_classifier(tmp_path, toy_data):
    raw = run_config(tmp_path, toy_data, "bert", data__packing=True)
    with pytest.raises(ConfigError, match="^data.packing: a classifier"):
        from_dict(RunConfig, raw)


def test_a_packed_chain_trains_as_the_padded_one_and_resumes(tmp_path, toy_data, tokenizer):
    def run(name, packing, stops=()):
        cfg = from_dict(RunConfig, run_config(tmp_path / name, toy_data, data__packing=packing))
        for stop in stops:
            assert (
                train(cfg, tiny_model("llama"), tokenizer, stop_after=stop, progress=False).summary["step"]
                == stop
            )
        summary = train(cfg, tiny_model("llama"), tokenizer, progress=False).summary
        losses = [
            json.loads(x)["loss"]
            for x in (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        ]
        return summary, losses, load_file(tmp_path / name / "run" / "chain.safetensors")

    padded, packed, resumed = run("padded", False), run("packed", True), run("resumed", True, stops=(3, 8))
    assert len(packed[1]) == 12 and packed[0]["chain_rank"] == 6
    torch.testing.assert_close(torch.tensor(packed[1]), torch.tensor(padded[1]), rtol=1e-4, atol=1e-6)
    for key in padded[2]:
        torch.testing.assert_close(packed[2][key], padded[2][key], rtol=1e-3, atol=1e-5)
        assert torch.equal(resumed[2][key], packed[2][key]), key
    assert packed[0]["links"][0]["tokens"] == padded[0]["links"][0]["tokens"]
