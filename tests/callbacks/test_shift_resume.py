"""ShiftTracker's reference in checkpoints: every rank's rows are saved once, and a run on any number of
processes that tests from the checkpoint tests against that same reference (the same p-value on 1 and 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import run_script, small_trainer

from lightning_phases import ShiftTracker

#: The tracker's arguments, the same in every run here and in ``scripts/ddp_shift_resume.py`` (passed to it).
TRACKER: dict[str, Any] = {
    "features": "input",
    "reference_size": 200,
    "current_size": 300,
    "n_permutations": 200,
    "seed": 0,
    "track_rates": False,
}
#: Test rows: an even split over 2 processes (DistributedSampler pads none), all kept (current_size 300).
TEST_SIZE = 296


def sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows in lexicographic order: two samples hold the same rows exactly when these are equal."""
    rows = rows.detach().cpu()
    for column in reversed(range(rows.shape[1])):
        rows = rows[torch.argsort(rows[:, column], stable=True)]
    return rows


def saved_rows(ckpt: Path) -> torch.Tensor:
    """The reference rows in the checkpoint's ShiftTracker state."""
    checkpoint = torch.load(ckpt, weights_only=False)
    [state] = [s for key, s in checkpoint["callbacks"].items() if key.startswith("ShiftTracker")]
    rows = state["reference_rows"]
    assert isinstance(rows, torch.Tensor) and rows.device.type == "cpu"
    return rows


def training_rows() -> torch.Tensor:
    """Every training input of the digits split (the same split whatever the test size: seed 0, 300 val)."""
    data = DigitsDataModule()
    data.setup("fit")
    return torch.stack([data.train_set[i][0] for i in range(len(data.train_set))])


def assert_distinct_training_rows(rows: torch.Tensor) -> None:
    """Every row is a training input, none twice (the digits inputs are all distinct)."""
    assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]
    train = training_rows()
    assert torch.unique(torch.cat([train, rows]), dim=0).shape[0] == train.shape[0]


def fresh_test_run(ckpt: Path, root: Path) -> tuple[ShiftTracker, pl.Trainer]:
    """A new Trainer with a new tracker tests the (unshifted) digits test split from ``ckpt`` on 1 process."""
    tracker = ShiftTracker(**TRACKER)
    trainer = small_trainer([tracker], limit_test_batches=None, default_root_dir=root)
    trainer.test(DigitsClassifier(), DigitsDataModule(test_size=TEST_SIZE), ckpt_path=ckpt, verbose=False)
    return tracker, trainer


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 1-process fit saved to a checkpoint, then tested from it by a new Trainer and tracker."""
    root = tmp_path_factory.mktemp("one_process")
    torch.manual_seed(0)  # the training loader's shuffle, hence the reference sample
    tracker = ShiftTracker(**TRACKER)
    trainer = small_trainer([tracker], limit_train_batches=None, limit_val_batches=None, default_root_dir=root)
    trainer.fit(DigitsClassifier(), DigitsDataModule())
    ckpt = root / "fit.ckpt"
    trainer.save_checkpoint(ckpt)
    fit_reference = tracker._reference.sample.clone()
    tested, test_trainer = fresh_test_run(ckpt, root / "test")
    return {
        "ckpt": ckpt,
        "fit_reference": fit_reference,
        "fit_tests": tracker.n_tests,
        "tracker": tested,
        "trainer": test_trainer,
        "fit_tracker": tracker,
        "fit_trainer": trainer,
    }


def test_checkpoint_holds_the_reference_and_a_new_trainer_tests_against_it(fitted: dict[str, Any]) -> None:
    rows = saved_rows(fitted["ckpt"])
    assert rows.shape == (200, 64)  # reference_size of the 1,200 training rows seen
    assert_distinct_training_rows(rows)
    assert torch.equal(sorted_rows(rows), sorted_rows(fitted["fit_reference"]))  # the last epoch's sample

    tracker: ShiftTracker = fitted["tracker"]
    [result] = [r for r in tracker.results if r["stage"] == "test"]
    assert (result["n_reference"], result["n_current"]) == (200, TEST_SIZE)
    assert tracker.n_tests == fitted["fit_tests"] + 1  # the count of tests continues from the checkpoint
    reference, current = tracker.last_samples
    assert torch.equal(sorted_rows(reference), sorted_rows(rows))
    assert current.shape == (TEST_SIZE, 64)


def test_restored_reference_is_on_the_root_device_with_its_dtype(fitted: dict[str, Any]) -> None:
    reference, _ = fitted["tracker"].last_samples
    assert reference.device == fitted["trainer"].strategy.root_device
    assert reference.dtype == saved_rows(fitted["ckpt"]).dtype == torch.float32


def test_a_loaded_reference_replaces_the_one_collected_before_in_what_is_saved(fitted: dict[str, Any]) -> None:
    tracker, trainer = fitted["fit_tracker"], fitted["fit_trainer"]  # it holds the reference of its own fit
    loaded = training_rows()[:50]
    tracker.load_state_dict({**tracker.state_dict(), "reference_rows": loaded})
    assert torch.equal(tracker._reference_rows(trainer, trainer.lightning_module), loaded)  # tested against
    assert torch.equal(tracker.state_dict()["reference_rows"], loaded)  # and saved: the same rows


def test_module_features_of_a_loaded_reference_are_not_those_of_the_reference_before(tmp_path: Path) -> None:
    """Two checkpoints at the same step, tested in turn by one tracker: each with its own reference."""
    torch.manual_seed(0)
    tracker = ShiftTracker(**{**TRACKER, "features": "backbone"})
    trainer = small_trainer([tracker], limit_train_batches=10, limit_val_batches=0, default_root_dir=tmp_path)
    model = DigitsClassifier()
    trainer.fit(model, DigitsDataModule())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=False)
    [state] = [s for key, s in checkpoint["callbacks"].items() if key.startswith("ShiftTracker")]
    state["reference_rows"] = state["reference_rows"][:120]  # another reference, saved at the same step
    torch.save(checkpoint, tmp_path / "b.ckpt")
    data = DigitsDataModule(test_size=TEST_SIZE)
    n_reference = []
    for name in ("a", "b"):
        trainer.test(model, data, ckpt_path=tmp_path / f"{name}.ckpt", verbose=False)
        n_reference.append(tracker.results[-1]["n_reference"])
    assert n_reference == [200, 120]


@pytest.mark.ddp
def test_two_processes_test_from_a_one_process_checkpoint_and_back(fitted: dict[str, Any], tmp_path: Path) -> None:
    run_script("ddp_shift_resume.py", str(tmp_path), str(fitted["ckpt"]), json.dumps(TRACKER), timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    # (a) the 1-process checkpoint tested on 2 processes: the same reference and test rows, the same test
    [expected] = [r for r in fitted["tracker"].results if r["stage"] == "test"]
    expected_reference, expected_current = fitted["tracker"].last_samples
    for rank, info in enumerate(ranks):
        [result] = [r for r in info["test_results"] if r["stage"] == "test"]
        assert (result["n_reference"], result["n_current"]) == (200, TEST_SIZE)
        # The same rows in the same order give the same permutations; the float32 kernel sums may round
        # differently with another thread count (1 process on 2 threads vs 2 processes on 1), so the
        # statistic agrees to float32 precision and the p-value to one permutation at most.
        assert result["statistic"] == pytest.approx(expected["statistic"], rel=1e-5), (rank, result, expected)
        one_permutation = 1.5 / (TRACKER["n_permutations"] + 1)
        assert result["p_value"] == pytest.approx(expected["p_value"], abs=one_permutation), (rank, result, expected)
        reference, current = info["test_samples"]
        assert torch.equal(sorted_rows(reference), sorted_rows(expected_reference))
        assert torch.equal(sorted_rows(current), sorted_rows(expected_current))
        # each rank tested with its share of the restored rows, on its root device, with their dtype
        assert info["share_device"] == info["root_device"] and info["share"].dtype == torch.float32
    shares = [info["share"] for info in ranks]
    assert [share.shape[0] for share in shares] == [100, 100]  # every other row of the checkpoint's 200
    assert torch.equal(sorted_rows(torch.cat(shares)), sorted_rows(saved_rows(fitted["ckpt"])))

    # (b) a 2-process fit's checkpoint holds both ranks' samples, once each
    rows = saved_rows(tmp_path / "ddp.ckpt")
    assert rows.shape == (200, 64)  # 100 kept on each rank, of 600 training rows each
    assert_distinct_training_rows(rows)
    both = torch.cat([ranks[0]["fit_reference"], ranks[1]["fit_reference"]])
    assert both.shape == (200, 64)
    assert torch.equal(sorted_rows(rows), sorted_rows(both))

    # ... and testing from it on 1 process uses all of them
    tracker, _ = fresh_test_run(tmp_path / "ddp.ckpt", tmp_path / "one")
    [result] = [r for r in tracker.results if r["stage"] == "test"]
    assert (result["n_reference"], result["n_current"]) == (200, TEST_SIZE)
    assert torch.equal(sorted_rows(tracker.last_samples[0]), sorted_rows(rows))
