"""LossDropSentinel's triage: is a flagged drop a capability jump, or something that helps only in training?

Real Trainer runs: a label leak in the training data only (``train_only``), the same leak reaching the
validation data too (``generalizes``: the held-out batches fall with it), an induction-head phase change of a
small transformer (``generalizes``), and the evaluation leaving the run exactly as it was.
"""

import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchmetrics
from digits import DigitsDataModule
from helpers import small_trainer
from induction import InductionModel, repeated_tokens
from sklearn.datasets import load_digits
from test_loss_drop import Scripted, fit
from typing_extensions import override
from workloads import PlainDigits

from lightning_phases import LossDropSentinel, PhaseUsageError, PhaseWarning
from lightning_phases.detectors.triage import expected_held_out, judge_drop, moved_like


def leak_fit(sentinel, tmp_path, steps=560, **model_options):
    """The digits model with a label leak from step 400, validation of 3 batches every 3 epochs."""
    pl.seed_everything(0)
    model = Scripted(leak_label_from_step=400, **model_options)
    return fit(sentinel, model, tmp_path, steps=steps, limit_val_batches=3, check_val_every_n_epoch=3)


def drops(sentinel):
    return [event for event in sentinel.events if event.kind == "loss_drop"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these small models' steps are up to 10x slower when two threads fight for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The decision itself ----------------------------------------------------------------------------------------


def test_judge_drop_compares_the_falls_on_the_log_scale_and_on_the_signed_one():
    followed = judge_drop(1.0, 0.1, 0.8, 0.1)  # both fell about 10x (log scale)
    assert (
        followed.label == "generalizes" and followed.scale == "log" and followed.followed == pytest.approx(0.903, 1e-3)
    )
    flat = judge_drop(1.0, 0.1, 0.8, 0.85)
    assert flat.label == "train_only" and flat.followed < 0
    signed = judge_drop(-1.0, -3.0, -0.9, -2.5)  # a Gaussian NLL: changes in its own units
    assert signed.scale == "signed" and signed.label == "generalizes" and signed.followed == pytest.approx(0.8)
    assert judge_drop(-1.0, -3.0, -0.9, -1.0).label == "train_only"
    assert judge_drop(1.0, 1.2, 0.8, 0.5).label == "unknown"  # no fall of the training loss to compare with
    # with a floor, changes of log(value - floor): the training loss halved its way to the floor, held-out not
    assert judge_drop(1.2, 1.1, 2.0, 1.9, floor=1.0).label == "train_only"
    assert judge_drop(1.2, 1.1, 2.0, 1.9).label == "generalizes"


# Real runs -------------------------------------------------------------------------------------------------


class CountsMetric(Scripted):
    """Scripted digits model whose validation_step also updates a torchmetrics metric and counts its calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.val_mean = torchmetrics.MeanMetric()
        self.validation_calls = 0

    @override
    def validation_step(self, batch, batch_idx):
        self.validation_calls += 1
        loss = torch.nn.functional.cross_entropy(self(batch[0]), batch[1])
        self.val_mean.update(loss)
        self.log("val_mean", self.val_mean)
        self.log("val_loss", loss)


def test_a_leak_in_the_training_data_is_train_only_and_the_evaluation_changes_nothing_in_the_run(tmp_path):
    runs = {}
    for batches in (4, 0):
        sentinel = LossDropSentinel(triage_batches=batches)
        pl.seed_everything(0)
        model = CountsMetric(leak_label_from_step=400)
        trainer = fit(
            sentinel, model, tmp_path / str(batches), steps=560, limit_val_batches=3, check_val_every_n_epoch=3
        )
        runs[batches] = (sentinel, model, trainer)
    (on, on_model, on_trainer), (off, off_model, off_trainer) = runs[4], runs[0]

    # the probe ran validation_step while training, and the run is bit-for-bit the run without it
    assert on.probe.evaluations >= 8 and on_model.validation_calls > off_model.validation_calls
    assert list(on.curve) == list(off.curve)
    assert on_trainer.callback_metrics["val_mean"] == off_trainer.callback_metrics["val_mean"]  # metric state kept
    assert all(
        torch.equal(a, b) for a, b in zip(on_model.state_dict().values(), off_model.state_dict().values(), strict=True)
    )

    leak = [event for event in drops(on) if event.global_step >= 400]
    assert len(leak) == 1 and leak[0].global_step < 500
    data = leak[0].data
    assert data["triage"] == "train_only"
    detail = data["triage_detail"]
    assert detail["held_out_metric"] == "val_loss" and detail["held_out_batches"] == 4
    assert detail["reference_step"] == 320  # references at 0, 10, 20, 40, 80, 160, 320: the last before onset
    assert detail["train_after"] < 0.3 * detail["train_before"]  # the training loss fell ...
    assert detail["held_out_after"] > 0.9 * detail["held_out_before"]  # ... the held-out loss did not
    assert detail["followed"] < 0.5 and detail["scale"] == "log"
    assert "triage: train_only" in leak[0].message and "suspect a label leak" in leak[0].message
    [row] = on.phase_observations()
    assert "1 train_only" in row.detail and f"{on.probe.evaluations} held-out evaluations of 4 batches" in row.detail

    # triage_batches=0: the same drop, with no held-out loss to compare, and no evaluation at all
    [off_leak] = [event for event in drops(off) if event.global_step >= 400]
    assert off_leak.global_step == leak[0].global_step
    assert off_leak.data["triage"] == "unknown" and off_leak.data["triage_detail"]["basis"].endswith("triage_batches=0")
    assert (
        off.probe.evaluations == 0
        and off_model.validation_calls == on_model.validation_calls - 4 * on.probe.evaluations
    )


def test_the_same_leak_reaching_the_validation_data_too_generalizes(tmp_path):
    sentinel = LossDropSentinel(triage_batches=2, triage_every_n_steps=50)
    leak_fit(sentinel, tmp_path, leak_in_validation=True)
    [leak] = [event for event in drops(sentinel) if event.global_step >= 400]
    detail = leak.data["triage_detail"]
    assert leak.data["triage"] == "generalizes" and detail["followed"] > 0.5
    assert detail["held_out_after"] < 0.2 * detail["held_out_before"]
    assert detail["held_out_batches"] == 2  # triage_batches
    assert detail["reference_step"] == 380  # references every 50 steps once the gaps reach it: ..., 330, 380, 430


def test_a_leak_the_held_out_loss_did_not_follow_is_train_only_whatever_coincided_with_it(tmp_path):
    """A learning-rate cut 2 steps before a leak: the cut coincides with the drop, but the held-out loss rose,
    which a rate change does not explain. Found by a new user's trial, where leaks during one-cycle and cosine
    schedules were all "explained": the held-out evidence now decides, and the drop is acted on even with
    ``ignore_explained``."""
    sentinel = LossDropSentinel(ignore_explained=True, on_violation="checkpoint")
    pl.seed_everything(0)
    model = Scripted(leak_label_from_step=400, lr_factor_at=(398, 0.5))
    fit(sentinel, model, tmp_path, limit_val_batches=3, check_val_every_n_epoch=3)
    [leak] = [event for event in drops(sentinel) if event.global_step >= 400]
    assert leak.data["lr_changed"] and leak.data["triage"] == "train_only" and leak.severity != "info"
    assert leak.data["triage_detail"]["followed"] < 0 and "checkpoint" in leak.data  # acted on
    assert "coincides with a learning-rate change" in leak.message
    assert "did not follow, which the coinciding change does not explain" in leak.message


def test_a_drop_both_losses_share_after_an_unfreeze_is_explained(tmp_path):
    """Unfreezing the backbone (no leak): both the training and the held-out loss fall faster. The coinciding
    change explains the drop, and the held-out loss does not contradict it."""
    from test_loss_drop import UnfreezeAt

    sentinel = LossDropSentinel()
    pl.seed_everything(2)
    fit(sentinel, UnfreezeAt(400), tmp_path, steps=700, noise=0.0, limit_val_batches=3, check_val_every_n_epoch=100)
    [drop] = drops(sentinel)
    assert drop.global_step > 400 and drop.data["trainable_changed"] and drop.data["triage"] == "explained"
    assert drop.data["triage_detail"]["comparison"] == "generalizes"
    assert "see the coinciding change" in drop.message


class OneCycle(Scripted):
    """``Scripted`` under a one-cycle schedule over 1,000 steps (peak 1e-2 at step 300)."""

    @override
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=1000)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_the_steady_moves_of_a_one_cycle_schedule_explain_no_drop(tmp_path):
    """Found by a new user's trial: a leak at 2/3 of a one-cycle schedule was "explained" by its rate moving
    10% over the drop's baseline. A rate that moves a few tenths of a percent per step is no sudden change."""
    sentinel = LossDropSentinel()
    pl.seed_everything(0)
    fit(sentinel, OneCycle(leak_label_from_step=650), tmp_path, steps=800, limit_val_batches=3)
    [leak] = [event for event in drops(sentinel) if event.global_step >= 650]
    assert not leak.data["lr_changed"] and "coincides" not in leak.message
    assert leak.data["lr_old"] == leak.data["lr_new"] and leak.data["triage"] == "train_only"
    rates = [change for change in sentinel._changes if change[1] == "lr"]
    assert rates and all(step < 200 for step, *_ in rates)  # only the warm-up moved 10% within 8 steps


def test_an_induction_head_phase_change_is_flagged_and_generalizes(tmp_path):
    pl.seed_everything(0)
    sentinel = LossDropSentinel()
    trainer = small_trainer(
        [sentinel],
        max_steps=1400,
        max_epochs=-1,
        limit_train_batches=1.0,
        limit_val_batches=2,
        check_val_every_n_epoch=1000,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer.fit(InductionModel(), repeated_tokens(32 * 1400, seed=1), repeated_tokens(128, seed=2))
    curve = dict(sentinel.curve)
    [event] = sentinel.events
    assert event.kind == "loss_drop" and event.data["triage"] == "generalizes"
    plateau, end = sum(curve[s] for s in range(500, 600)) / 100, sum(curve[s] for s in range(1300, 1400)) / 100
    assert end < 0.7 * plateau  # a real phase change: the loss fell by a third or more after a plateau
    assert curve[event.global_step] < 0.95 * plateau  # flagged during the fall, not before it
    detail = event.data["triage_detail"]
    assert detail["held_out_after"] < 0.8 * detail["held_out_before"] and detail["followed"] > 0.5


# Which value is the held-out loss -----------------------------------------------------------------------------


class LogsNll(Scripted):
    """validation_step logs its loss as ``val/nll`` (no name says loss) and an accuracy."""

    @override
    def validation_step(self, batch, batch_idx):
        logits = self(batch[0])
        self.log("val/nll", torch.nn.functional.cross_entropy(logits, batch[1]))
        self.log("val_acc", (logits.argmax(-1) == batch[1]).float().mean())


def short_fit(sentinel, model, tmp_path):
    return fit(sentinel, model, tmp_path, steps=12, limit_val_batches=2, check_val_every_n_epoch=100)


def test_triage_metric_names_the_held_out_loss_and_none_finds_none_that_says_loss(tmp_path):
    named = LossDropSentinel(triage_metric="val/nll")
    short_fit(named, LogsNll(), tmp_path / "named")
    assert named.probe.resolved == "val/nll" and [step for step, _ in named._references] == [0, 10]

    default = LossDropSentinel()
    short_fit(default, LogsNll(), tmp_path / "default")
    assert default.probe.evaluations == 0 and not default.probe.available  # found no loss: triage is off
    assert "'val/nll', 'val_acc'" in default.probe.unavailable and "triage_metric" in default.probe.unavailable

    returned = LossDropSentinel()  # DigitsClassifier logs val_loss
    short_fit(returned, Scripted(), tmp_path / "logged")
    assert returned.probe.resolved == "val_loss"


def test_a_triage_metric_that_names_a_score_is_refused_and_one_that_names_a_loss_is_not():
    """Found by a new user's trial: triage_metric="val_acc" was taken, and a real capability jump (accuracy
    0.55 -> 0.85) read as a held-out loss that rose: train_only."""
    for score in ("val_acc", "val/accuracy", "valid_f1", "val_auroc"):
        with pytest.raises(ValueError, match=rf"triage_metric='{score}' names a score \(higher is better\)"):
            LossDropSentinel(triage_metric=score)
    for loss in ("val_dice_loss", "val/top1_error", "val_mape", "val/nll"):
        assert LossDropSentinel(triage_metric=loss).triage_metric == loss


def test_the_report_row_names_the_held_out_loss_triage_used(tmp_path):
    sentinel = LossDropSentinel(triage_metric="val/nll")
    short_fit(sentinel, LogsNll(), tmp_path)
    [row] = sentinel.phase_observations()
    assert row.detail.endswith("2 held-out evaluations of 4 batches (val/nll)")


def test_a_triage_metric_that_validation_step_does_not_log_fails_before_the_first_training_step(tmp_path):
    sentinel = LossDropSentinel(triage_metric="val/loss")
    with pytest.raises(PhaseUsageError, match=r"triage_metric='val/loss' is not a value that validation_step logs"):
        short_fit(sentinel, LogsNll(), tmp_path)
    assert sentinel.checked == 0


class ToolInValidation(Scripted):
    """validation_step raises when it runs while training (as a model whose step calls a blocked tool would)."""

    @override
    def validation_step(self, batch, batch_idx):
        if self.trainer.training:
            raise ConnectionRefusedError("the tool is not reachable from here")
        return super().validation_step(batch, batch_idx)


def test_a_validation_step_that_fails_while_training_turns_triage_off_and_the_sentinel_keeps_watching(tmp_path):
    sentinel = LossDropSentinel()
    leak_fit(sentinel, tmp_path, steps=480)
    baseline = [event.global_step for event in drops(sentinel)]
    failing = LossDropSentinel()
    pl.seed_everything(0)
    fit(failing, ToolInValidation(leak_label_from_step=400), tmp_path / "failing", steps=480, limit_val_batches=3,
        check_val_every_n_epoch=3)  # fmt: skip
    assert [event.global_step for event in drops(failing)] == baseline  # the same flags
    assert all(event.data["triage"] == "unknown" for event in drops(failing))
    assert "ConnectionRefusedError: the tool is not reachable" in drops(failing)[-1].data["triage_detail"]["basis"]
    assert not any(event.kind == "internal_error" for event in failing.events)


def test_a_validation_metric_drop_is_judged_on_held_out_data_itself(tmp_path):
    sentinel = LossDropSentinel(monitor="val_loss")
    pl.seed_everything(0)
    fit(sentinel, Scripted(leak_label_from_step=200, leak_in_validation=True), tmp_path, steps=-1, max_epochs=30,
        limit_train_batches=10, limit_val_batches=5)  # fmt: skip
    [event] = sentinel.events
    assert event.data["triage"] == "generalizes"
    detail = event.data["triage_detail"]  # the leak reaches the cached validation batches too: they fell with it
    assert detail["basis"].endswith("cached from the validation data when fitting started") and detail["followed"] > 0.5


class OverlappingValidation(torch.utils.data.Dataset):
    """The validation images, or, once ``overlap`` is set, as many training images: a validation set that came
    to overlap the training data (a split done again mid-run, a path pointing at the wrong shard)."""

    def __init__(self, validation, training):
        self.validation, self.training, self.overlap = validation, training, False

    def __len__(self):
        return len(self.validation[0])

    def __getitem__(self, index):
        images, labels = self.training if self.overlap else self.validation
        return images[index], labels[index]


class OverlapFrom(pl.Callback):
    def __init__(self, dataset, step):
        self.dataset, self.step = dataset, step

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.dataset.overlap = trainer.global_step >= self.step


@pytest.mark.parametrize("overlap_from", [600, None])
def test_a_validation_set_that_comes_to_overlap_the_training_data_is_train_only(tmp_path, overlap_from):
    """A new user's trial: the validation DataLoader served training samples from step 600, and the flagged
    val_loss drop said ``generalizes`` (the monitored value is held-out data). The batches cached from the
    validation data when fitting started did not fall with it: ``train_only``, the validation data changed.
    The same run without the overlap is silent."""
    images, labels = load_digits(return_X_y=True)
    images, labels = torch.tensor(images, dtype=torch.float32) / 16, torch.tensor(labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    validation = OverlappingValidation((images[1500:], labels[1500:]), (images[:1500], labels[:1500]))
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images[:1500], labels[:1500]), batch_size=32, shuffle=True
    )
    sentinel = LossDropSentinel(monitor="val_loss")
    callbacks = [sentinel] + ([OverlapFrom(validation, overlap_from)] if overlap_from else [])
    pl.seed_everything(0)
    trainer = small_trainer(
        callbacks, default_root_dir=tmp_path, max_steps=1000, max_epochs=-1, limit_train_batches=1.0,
        limit_val_batches=1.0, val_check_interval=0.25, num_sanity_val_steps=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer.fit(PlainDigits(hidden=256, layers=2), train, torch.utils.data.DataLoader(validation, batch_size=64))
    if overlap_from is None:
        assert sentinel.events == []
        return
    [event] = sentinel.events
    assert event.kind == "loss_drop" and overlap_from <= event.global_step <= overlap_from + 50
    assert event.data["triage"] == "train_only" and "the validation data changed" in event.message
    detail = event.data["triage_detail"]
    assert detail["held_out_metric"] == "val_loss" and detail["followed"] < 0.5


def test_without_validation_data_triage_is_unknown_and_says_why(tmp_path):
    sentinel = LossDropSentinel()
    with pytest.warns(PhaseWarning, match="drops cannot be triaged, no held-out loss to compare: no validation data"):
        pl.seed_everything(0)
        trainer = small_trainer(
            [sentinel],
            max_steps=480,
            max_epochs=-1,
            limit_train_batches=1.0,
            limit_val_batches=0,
            default_root_dir=tmp_path,
        )
        trainer.fit(Scripted(leak_label_from_step=400), DigitsDataModule(label_noise=0.2))
    leak = [event for event in drops(sentinel) if event.global_step >= 400]
    assert leak and leak[0].data["triage"] == "unknown" and "triage: unknown" in leak[0].message


def test_a_module_with_a_validation_step_fitted_without_validation_data_is_still_watched(tmp_path):
    """Found by a new user's trial: ``trainer.fit(model, train_loader)`` with a module that defines
    ``validation_step`` (Lightning trains it without validating). Setting up the validation DataLoaders raised
    there, and the sentinel checked nothing for the rest of the run (one ``internal_error``)."""
    sentinel = LossDropSentinel()
    datamodule = DigitsDataModule(label_noise=0.2)
    datamodule.setup("fit")
    with pytest.warns(PhaseWarning, match="no held-out loss to compare: no validation data"):
        pl.seed_everything(0)
        trainer = small_trainer(
            [sentinel], max_steps=480, max_epochs=-1, limit_train_batches=1.0, default_root_dir=tmp_path
        )
        trainer.fit(Scripted(leak_label_from_step=400), datamodule.train_dataloader())
    assert [event.kind for event in sentinel.events if event.kind != "loss_drop"] == []
    assert sentinel.checked == 480
    leak = [event for event in drops(sentinel) if event.global_step >= 400]
    assert leak and leak[0].data["triage"] == "unknown"


# What a new user's module does in validation, undisturbed ---------------------------------------------------


class NoisyValidation(torch.utils.data.Dataset):
    """Digits validation samples with NumPy noise drawn in ``__getitem__`` (from NumPy's global generator)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        x, y = self.dataset[index]
        return x + torch.from_numpy(np.random.normal(0, 0.01, x.shape).astype("float32")), y


class NoisyDigits(DigitsDataModule):
    @override
    def val_dataloader(self):
        return self._loader(NoisyValidation(self.val_set))


class UsersPatterns(Scripted):
    """What users' modules do in validation (Lightning's docs, the lightning-hydra-template):

    the loss logged as a torchmetrics ``MeanMetric`` under ``val/loss``, an accuracy returned (not the loss),
    ``validation_step_outputs`` averaged and cleared at epoch end, a metric kept in a plain dict, and an
    augmentation in ``on_after_batch_transfer`` applied only while training.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.val_loss = torchmetrics.MeanMetric()
        self.plain = {"acc": torchmetrics.classification.MulticlassAccuracy(num_classes=10)}
        self.validation_step_outputs = []
        self._epoch_ends = []  # (outputs seen, their mean, the plain-dict accuracy) at each validation end
        self._transferred = []

    @override
    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        if self.trainer.training:
            x = x + 100.0  # an augmentation meant for training batches only
        self._transferred.append(float(x.max()))
        return x, y

    @override
    def validation_step(self, batch, batch_idx):
        logits = self(batch[0])
        loss = torch.nn.functional.cross_entropy(logits, batch[1])
        self.val_loss(loss)
        self.plain["acc"].update(logits, batch[1])
        self.validation_step_outputs.append(loss)
        self.log("val/loss", self.val_loss)
        return (logits.argmax(-1) == batch[1]).float().mean()  # an accuracy: must not be taken for the loss

    @override
    def on_validation_epoch_end(self):
        outputs = torch.stack(self.validation_step_outputs)
        self._epoch_ends.append((len(outputs), float(outputs.mean()), float(self.plain["acc"].compute())))
        self.validation_step_outputs.clear()
        self.plain["acc"].reset()

    @override
    def training_step(self, batch, batch_idx):
        x, y = batch
        return super().training_step((x - 100.0, y), batch_idx)  # undo the augmentation (the test needs the digits)


def test_what_users_do_in_validation_is_left_as_it_was_and_the_logged_metric_is_the_held_out_loss(tmp_path):
    runs = {}
    for batches in (4, 0):
        sentinel = LossDropSentinel(triage_batches=batches)
        pl.seed_everything(0)
        np.random.seed(0)
        model = UsersPatterns(leak_label_from_step=400)
        trainer = small_trainer([sentinel], max_steps=480, max_epochs=-1, limit_train_batches=1.0, limit_val_batches=3,
                                check_val_every_n_epoch=3, default_root_dir=tmp_path / str(batches))  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PhaseWarning)
            trainer.fit(model, NoisyDigits(label_noise=0.2))
        runs[batches] = (sentinel, model, trainer)
    (on, on_model, on_trainer), (off, off_model, off_trainer) = runs[4], runs[0]
    assert on.probe.evaluations >= 8
    assert list(on.curve) == list(off.curve)  # NumPy's generator too: the same noise, the same run
    assert on_model._epoch_ends == off_model._epoch_ends  # outputs list and plain-dict metric as without it
    assert on_trainer.callback_metrics["val/loss"] == off_trainer.callback_metrics["val/loss"]
    assert on.probe.resolved == "val/loss"  # the logged Metric, not the returned accuracy
    assert max(on_model._transferred[: 2 + 4]) < 50  # sanity batches and the cached ones: not augmented
    [leak] = [event for event in drops(on) if event.global_step >= 400]
    assert leak.data["triage"] == "train_only"
    assert leak.data["triage_detail"]["held_out_metric"] == "val/loss"


def test_moved_like_scales_above_the_floor_and_shifts_a_signed_loss():
    assert moved_like(0.6, 0.5, 0.25) == pytest.approx(0.3)  # the other loss halved: so does this one
    assert moved_like(1.2, 1.5, 1.25, floor=1.0) == pytest.approx(1.1)  # halved above the floor of 1
    assert moved_like(0.2, 0.5, -0.5) == pytest.approx(-0.8)  # signed: the same difference


def test_the_expected_held_out_loss_lies_between_the_training_trend_and_no_change_on_its_own_trend():
    # the training loss halved since the last reference (step 200): the training trend expects 0.4 from 0.8
    both_fell = [(100, 1.6), (200, 0.8)]  # the held-out loss halved every 100 steps too: it follows
    assert expected_held_out(both_fell, 1.0, 0.5, 300) == (pytest.approx(0.4), "the training trend")
    flatter = [(100, 0.9), (200, 0.8)]  # it fell by 1/9 in 100 steps, read 100 steps ahead: 0.8 * 8/9
    assert expected_held_out(flatter, 1.0, 0.5, 300) == (pytest.approx(0.8 * 8 / 9), "its own trend")
    rising = [(100, 0.7), (200, 0.8)]  # overfitting: it is not expected to rise further, nor to follow
    assert expected_held_out(rising, 1.0, 0.5, 300) == (0.8, "its reference level")
    # one reference: the training trend; a training loss that rose since: the held-out loss may fall on its own
    assert expected_held_out([(200, 0.8)], 1.0, 0.5, 300) == (pytest.approx(0.4), "the training trend")
    assert expected_held_out(flatter, 1.0, 1.5, 300) == (0.8, "its reference level")
    # signed losses move by differences; a floor: by factors above it
    assert expected_held_out([(100, -0.5), (200, -0.6)], -1.0, -2.0, 300) == (pytest.approx(-0.7), "its own trend")
    assert expected_held_out([(100, 1.4), (200, 1.2)], 1.5, 1.25, 300, floor=1.0) == (
        pytest.approx(1.1),
        "the training trend",
    )
    with pytest.raises(ValueError, match="at least one reference"):
        expected_held_out([], 1.0, 0.5, 300)


class DictMLP(pl.LightningModule):
    """A new user's MLP on dict batches, Adam 1e-3; the label leaks into border pixels from ``leak_from``."""

    def __init__(self, leak_from: int, leak_in_validation: bool) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        self.leak_from, self.leak_in_validation = leak_from, leak_in_validation

    def loss(self, batch, leak):
        x, y = batch["x"], batch["y"]
        if leak:
            x = x.clone()
            x[:, [0, 7, 8, 15, 16, 23, 24, 31, 32, 39]] = torch.nn.functional.one_hot(y, 10).float() * 3
        return torch.nn.functional.cross_entropy(self.net(x), y)

    @override
    def training_step(self, batch, batch_idx):
        return self.loss(batch, self.global_step >= self.leak_from)

    @override
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch, self.leak_in_validation and self.global_step >= self.leak_from))

    @override
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def fit_steps(sentinel, model, loaders, tmp_path, steps, **options):
    """Fit ``model`` on ``(train, val)`` for ``steps`` steps; 3 validation batches, cached by the triage only."""
    trainer = small_trainer(
        [sentinel],
        default_root_dir=tmp_path,
        max_steps=steps,
        max_epochs=-1,
        limit_train_batches=1.0,
        limit_val_batches=3,
        check_val_every_n_epoch=1000,
        **options,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer.fit(model, *loaders)


def dict_loaders():
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    x, y = torch.tensor(images, dtype=torch.float32)[order] / 16, torch.tensor(labels)[order]
    rows = [{"x": xi, "y": yi} for xi, yi in zip(x, y, strict=True)]
    train = torch.utils.data.DataLoader(rows[:1400], batch_size=32, shuffle=True)
    return train, torch.utils.data.DataLoader(rows[1400:], batch_size=100)


@pytest.mark.parametrize(("leak_in_validation", "label"), [(False, "train_only"), (True, "generalizes")])
def test_a_leak_during_the_first_descent_is_triaged_net_of_the_trend(tmp_path, leak_in_validation, label):
    """Found by a new user's trial: a leak at step 300 of a descent still under way, with gradient
    accumulation, was triaged "generalizes": the last reference (step 160) came before 140 steps of ordinary
    learning that lowered the held-out loss too. The held-out loss is now measured from where it would be had
    it moved as the training loss' forecast did since the reference; the same leak reaching the validation
    data too is still a capability jump by this measure."""
    pl.seed_everything(0)
    sentinel = LossDropSentinel()
    fit_steps(sentinel, DictMLP(300, leak_in_validation), dict_loaders(), tmp_path, 400, accumulate_grad_batches=4)
    [drop] = drops(sentinel)
    detail = drop.data["triage_detail"]
    assert drop.global_step >= 300 and detail["reference_step"] < 300 and drop.data["triage"] == label
    # the training trend since the reference would have lowered the held-out loss too
    assert detail["held_out_expected"] < 0.9 * detail["held_out_before"]
    assert f"expected on the training trend; training {drop.data['level']:.4g}" in drop.message


class OverfittingDictMLP(DictMLP):
    """``DictMLP`` 4x wider, on 160 training samples of which 30% have random labels: it memorises them (its
    training loss keeps falling while its held-out loss rises), and the label leaks in from ``leak_from``."""

    def __init__(self, leak_from: int, leak_in_validation: bool) -> None:
        super().__init__(leak_from, leak_in_validation)
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))


def overfitting_loaders(seed=1):
    """160 shuffled digits to train on, 30% of them with random labels; 397 others to validate on."""
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    x, y = torch.tensor(images, dtype=torch.float32)[order] / 16, torch.tensor(labels)[order]
    noisy, generator = y[:160].clone(), torch.Generator().manual_seed(seed + 1)
    flip = torch.rand(160, generator=generator) < 0.3
    noisy[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=generator)
    train = [{"x": xi, "y": yi} for xi, yi in zip(x[:160], noisy, strict=True)]
    val = [{"x": xi, "y": yi} for xi, yi in zip(x[1400:], y[1400:], strict=True)]
    return (
        torch.utils.data.DataLoader(train, batch_size=32, shuffle=True),
        torch.utils.data.DataLoader(val, batch_size=100),
    )


@pytest.mark.parametrize(("leak_in_validation", "label"), [(True, "generalizes"), (False, "train_only")])
def test_a_jump_while_the_model_overfits_is_measured_against_where_the_held_out_loss_was_heading(
    tmp_path, leak_in_validation, label
):
    """While a model memorises, its training loss falls and its held-out loss does not: the training trend since
    a reference 400 steps back would have the held-out loss fall 2.7x by the drop. A capability jump is now
    measured against where the held-out loss itself was heading (it was rising: its reference level), so all of
    its fall counts; the training trend would have counted about half of it."""
    pl.seed_everything(1)
    sentinel = LossDropSentinel(triage_every_n_steps=1000)  # references at 0, 10, ..., 320, 640: one 400 back
    fit_steps(sentinel, OverfittingDictMLP(1000, leak_in_validation), overfitting_loaders(), tmp_path, 1100)
    [drop] = drops(sentinel)
    detail = drop.data["triage_detail"]
    assert 1000 <= drop.global_step <= 1060 and drop.data["triage"] == label
    # the held-out loss rose from step 320 to 640 (overfitting), so it is expected to stay where it was ...
    references = dict(sentinel._references)
    assert detail["reference_step"] == 640 and references[640] > references[320]
    assert detail["expected_on"] == "its reference level" and detail["held_out_expected"] == detail["held_out_before"]
    assert f"expected on its reference level; training {drop.data['level']:.4g}" in drop.message
    # ... where the training trend would expect it far lower: the training loss fell ~4x since the reference
    on_training = moved_like(detail["held_out_before"], detail["train_before"], detail["train_forecast"])
    assert on_training < 0.5 * detail["held_out_before"]
    if leak_in_validation:  # all of the held-out loss' fall counts: it fell further (in log) than training's
        assert detail["followed"] > 1.0
        old = judge_drop(detail["train_forecast"], detail["train_level"], on_training, detail["held_out_after"])
        assert old.followed < 0.75  # on the training trend, about half of it


class ScoredDigits(PlainDigits):
    """PlainDigits that also logs its validation accuracy."""

    @override
    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.log("val_acc", (self.net(batch[0]).argmax(-1) == batch[1]).float().mean())


def test_a_sudden_fall_of_a_score_is_a_loss_of_performance_not_a_capability(tmp_path):
    """A new user's trial: a sentinel on ``val_acc`` was accepted (a sudden fall of a score is worth knowing),
    but its triage would have said ``generalizes``, a capability jump. A score that falls has lost performance:
    the triage says ``unknown`` and why. Here the validation labels become random from step 400."""
    images, labels = load_digits(return_X_y=True)
    images, labels = torch.tensor(images, dtype=torch.float32) / 16, torch.tensor(labels)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    scrambled = labels[1500:][torch.randperm(297, generator=torch.Generator().manual_seed(1))]
    validation = OverlappingValidation((images[1500:], labels[1500:]), (images[1500:], scrambled))
    train = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images[:1500], labels[:1500]), batch_size=32, shuffle=True
    )
    sentinel = LossDropSentinel(monitor="val_acc")
    pl.seed_everything(0)
    trainer = small_trainer(
        [sentinel, OverlapFrom(validation, 400)], default_root_dir=tmp_path, max_steps=700, max_epochs=-1,
        limit_train_batches=1.0, limit_val_batches=1.0, val_check_interval=0.25, num_sanity_val_steps=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer.fit(ScoredDigits(), train, torch.utils.data.DataLoader(validation, batch_size=64))
    [event] = sentinel.events
    assert event.kind == "loss_drop" and 400 <= event.global_step <= 450
    assert event.data["triage"] == "unknown" and "val_acc is a score" in event.data["triage_detail"]["basis"]
    assert "triage: unknown (val_acc is a score" in event.message
