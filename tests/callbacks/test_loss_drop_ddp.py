import json
from pathlib import Path

import pytest
import torch
from helpers import read_jsonl, run_script

pytestmark = pytest.mark.ddp


def test_ddp_drop_on_one_rank_gives_the_same_decision_on_both_and_no_hang(tmp_path):
    run_script("ddp_loss_drop.py", str(tmp_path), timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, outcome in enumerate(ranks):
        assert outcome["raised"] is not None, f"rank {rank} did not raise"
        assert outcome["raised"]["kind"] == "loss_drop" and outcome["raised"]["rank"] == rank
        assert 250 <= outcome["raised"]["global_step"] < 350
    same = ("global_step", "message", "data")
    assert [ranks[0]["raised"][k] for k in same] == [ranks[1]["raised"][k] for k in same]
    assert ranks[0]["checked"] == ranks[1]["checked"]  # both ranks judged the same (averaged) values
    logged = read_jsonl(tmp_path / "phase_events.jsonl")
    assert [e["kind"] for e in logged] == ["loss_drop"] and Path(logged[0]["data"]["checkpoint"]).exists()


def test_ddp_checkpoint_between_checks_keeps_the_waiting_values_averaged_over_ranks(tmp_path):
    run_script("ddp_loss_drop_pending.py", str(tmp_path), timeout=300)  # finishes: no rank waits alone
    local = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(local[0]) == len(local[1]) == 5 and local[0] != local[1]  # steps 11..15, different batches
    [ckpt] = (tmp_path / "ckpt").glob("*.ckpt")
    [state] = [s for k, s in torch.load(ckpt, weights_only=False)["callbacks"].items() if "LossDropSentinel" in k]
    assert state["pending_steps"] == [11, 12, 13, 14, 15]
    assert state["pending"] == pytest.approx([(a + b) / 2 for a, b in zip(*local, strict=True)])


def test_ddp_validation_metric_triage_evaluates_the_cached_batches_on_every_rank_alike(tmp_path):
    """A sentinel on val_loss compares its drops with the validation batches cached at fitting start, evaluated at
    validation ends: a collective in DDP. Both ranks take the same references and the same triage, and finish."""
    run_script("ddp_val_loss.py", str(tmp_path), timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 500
    assert ranks[0]["evaluations"] == ranks[1]["evaluations"] > 2
    drops = [[(e["kind"], e["global_step"], e["data"]["triage"]) for e in r["events"]] for r in ranks]
    assert drops[0] == drops[1] and drops[0] and drops[0][0][0] == "loss_drop" and drops[0][0][1] >= 300
    assert drops[0][0][2] == "generalizes"  # the leak reaches the cached validation batches too
