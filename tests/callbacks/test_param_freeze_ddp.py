import json

import pytest
from helpers import read_jsonl, run_script

pytestmark = pytest.mark.ddp


def test_ddp_replica_mismatch_and_one_rank_change_raise_identically_on_both_ranks(tmp_path):
    run_script("ddp_freeze.py", str(tmp_path), timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["fit_events"] == ranks[1]["fit_events"] == 0  # a clean DDP fit: replicas agree, nothing moved
    for rank, outcome in enumerate(ranks):
        mismatch = outcome["perturb_at_start"]
        assert mismatch is not None, f"rank {rank} did not raise"
        assert mismatch["kind"] == "replica_mismatch" and mismatch["rank"] == rank
        assert mismatch["data"]["tensors"] == ["head.bias"]
        assert mismatch["data"]["rank_groups"] == {"head.bias": [[0], [1]]}
        changed = outcome["change_in_test"]
        assert changed is not None and changed["kind"] == "param_changed"
        assert changed["data"]["tensors"] == ["backbone.0.weight"]
        assert changed["data"]["ranks"] == {"backbone.0.weight": [1]}  # seen on rank 1 only, raised on both
    strip = lambda e: {k: v for k, v in e.items() if k not in ("time", "rank")}  # noqa: E731
    assert strip(ranks[0]["change_in_test"]) == strip(ranks[1]["change_in_test"])
    logged = read_jsonl(tmp_path / "phase_events.jsonl")
    assert [e["kind"] for e in logged] == ["replica_mismatch", "param_changed"]  # once each, by rank 0
