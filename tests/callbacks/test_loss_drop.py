import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import read_jsonl, small_trainer
from torch import nn
from typing_extensions import override

from lightning_phases import LossDropDetected, LossDropSentinel, PhaseWarning


class Scripted(DigitsClassifier):
    """The digits model with scripted events at given global steps, on top of its label-leak switch.

    Args:
        shuffle_at: Steps whose batch labels are shuffled (a real loss spike).
        lr_factor_at: ``(step, factor)``: multiply every learning rate by ``factor`` at ``step``.
        nan_at: Training batches (counted from 0) whose returned loss is NaN; needs ``manual``, which then
            skips that update (``global_step`` counts optimizer steps, so it does not advance there).
        manual: Use manual optimization.
        kwargs: Passed to ``DigitsClassifier`` (e.g. ``leak_in_validation``).
    """

    def __init__(self, leak_label_from_step=-1, shuffle_at=(), lr_factor_at=None, nan_at=(), manual=False, **kwargs):
        super().__init__(leak_label_from_step=leak_label_from_step, **kwargs)
        self.shuffle_at, self.lr_factor_at, self.nan_at = set(shuffle_at), lr_factor_at, set(nan_at)
        self.automatic_optimization = not manual
        self.batches_seen = 0

    @override
    def training_step(self, batch, batch_idx):
        x, y = self.leak(batch)
        if self.global_step in self.shuffle_at:
            y = y[torch.randperm(len(y))]
        if self.lr_factor_at and self.global_step == self.lr_factor_at[0]:
            for group in self.trainer.optimizers[0].param_groups:
                group["lr"] *= self.lr_factor_at[1]
        loss = nn.functional.cross_entropy(self(x), y)
        if self.automatic_optimization:
            return loss
        self.batches_seen += 1
        if self.batches_seen - 1 in self.nan_at:
            return torch.tensor(float("nan"))
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return loss


@pytest.fixture(autouse=True)
def seeded():
    """Each test builds its model after the same seed, whatever ran before it (``fit`` seeds only the run)."""
    pl.seed_everything(0)


def fit(sentinel, model, tmp_path, steps=560, noise=0.2, ckpt_path=None, **kwargs):
    pl.seed_everything(0)
    options = dict(max_steps=steps, max_epochs=-1, limit_train_batches=1.0, limit_val_batches=0)
    options.update(kwargs)
    trainer = small_trainer([sentinel], default_root_dir=tmp_path, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer.fit(model, DigitsDataModule(label_noise=noise), ckpt_path=ckpt_path)
    return trainer


def logged(tmp_path):
    path = Path(tmp_path) / "phase_events.jsonl"
    return read_jsonl(path) if path.exists() else []


def test_silent_on_a_clean_run(tmp_path):
    sentinel = LossDropSentinel(direction="both")
    fit(sentinel, Scripted(), tmp_path)
    assert sentinel.events == [] and sentinel.checked == 560
    [row] = sentinel.phase_observations()
    assert row.verdict == "no sudden change" and row.detail.startswith("560 values of loss checked, 0 drops")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_label_leak_is_flagged_within_100_steps(tmp_path, accumulate):
    sentinel = LossDropSentinel()
    leak_step = 400 // accumulate  # global steps count optimizer steps; each sees `accumulate` batches
    fit(
        sentinel,
        Scripted(leak_label_from_step=leak_step),
        tmp_path,
        accumulate_grad_batches=accumulate,
        steps=560 // accumulate,
    )
    [event] = logged(tmp_path)
    assert event["kind"] == "loss_drop" and event["stage"] == "train" and event["severity"] == "warning"
    assert leak_step <= event["global_step"] < leak_step + 100
    data = event["data"]
    assert {"value", "forecast", "score", "threshold", "level", "change", "onset_step"} <= set(data)
    assert data["score"] < -data["threshold"] and data["level"] < data["forecast"] and data["change"] < -0.5
    assert data["lr_changed"] is False and data["trainable_changed"] is False
    # the message gives the newest value beside the recent median (a trial found the drop's % alone understated it)
    assert f"(now {data['level']:.4g}, last value {data['value']:.4g}, score" in event["message"]
    assert sentinel.checked == 560 // accumulate  # one value per optimizer step
    plot = Path(tmp_path) / "loss_drop_sentinel_loss_curve.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the curve with its flag, beside the event log


def test_validation_loss_drop_is_checked_when_validation_ends(tmp_path):
    sentinel = LossDropSentinel(monitor="val_loss")
    fit(
        sentinel,
        Scripted(leak_label_from_step=200, leak_in_validation=True),
        tmp_path,
        steps=-1,
        max_epochs=30,
        limit_train_batches=10,
        limit_val_batches=5,
    )
    [event] = sentinel.events
    assert event.kind == "loss_drop" and event.stage == "validate" and event.data["monitor"] == "val_loss"
    assert 200 <= event.global_step <= 260  # within a few validations (one every 10 steps)
    assert sentinel.source == "validation" and sentinel.checked == 30


def test_spike_and_recovery_give_a_spike_and_no_drop(tmp_path):
    sentinel = LossDropSentinel(direction="both")
    fit(sentinel, Scripted(shuffle_at=range(400, 406)), tmp_path)
    assert [e.kind for e in sentinel.events] == ["loss_spike"]
    assert 400 <= sentinel.events[0].global_step < 420


def test_a_drop_coinciding_with_a_learning_rate_change_is_explained(tmp_path):
    sentinel = LossDropSentinel(ignore_explained=True, on_violation="raise")
    # the leak makes the drop; a learning-rate change two steps before it coincides with it
    fit(sentinel, Scripted(leak_label_from_step=400, lr_factor_at=(398, 0.5)), tmp_path)  # explained: no raise
    [event] = sentinel.events
    assert event.kind == "loss_drop" and event.severity == "info"
    assert event.data["lr_changed"] is True
    assert event.data["lr_old"] == [pytest.approx(3e-3)] and event.data["lr_new"] == [pytest.approx(1.5e-3)]
    assert "learning-rate change" in event.message


def test_nan_is_its_own_event_and_detection_works_afterwards_with_manual_optimization(tmp_path):
    sentinel = LossDropSentinel(check_every_n_steps=1)
    fit(sentinel, Scripted(leak_label_from_step=400, nan_at=(300,), manual=True), tmp_path)
    kinds = [(e.kind, e.global_step) for e in sentinel.events]
    assert kinds[0][0] == "non_finite_loss" and 295 <= kinds[0][1] <= 305
    assert [k for k, _ in kinds[1:]] == ["loss_drop"] and 400 <= kinds[1][1] < 500


def test_suspend_then_resume_continues_without_reflagging(tmp_path):
    sentinel = LossDropSentinel(on_violation="suspend")
    trainer = fit(sentinel, Scripted(leak_label_from_step=400), tmp_path)
    [event] = sentinel.events
    checkpoint = Path(event.data["checkpoint"])
    assert checkpoint.exists() and checkpoint.name == f"loss_drop-loss-step{event.global_step}.ckpt"
    assert trainer.global_step == event.global_step  # stopped right there, cleanly
    resumed = LossDropSentinel(on_violation="suspend")
    trainer = fit(resumed, Scripted(leak_label_from_step=400), tmp_path, steps=700, ckpt_path=str(checkpoint))
    assert trainer.global_step == 700 and resumed.events == []
    assert resumed.checked == 700  # continued counting: no new warm-up
    assert resumed.flags == sentinel.flags


def test_raise_checkpoints_first_and_the_event_is_on_disk(tmp_path):
    sentinel = LossDropSentinel(on_violation="raise")
    with pytest.raises(LossDropDetected, match="loss dropped") as info:
        fit(sentinel, Scripted(leak_label_from_step=400), tmp_path)
    [event] = logged(tmp_path)
    assert info.value.event.to_dict() == event
    assert Path(event["data"]["checkpoint"]).exists()


def test_missing_monitor_raises_by_default_and_warns_once_when_not_strict(tmp_path):
    def run(sentinel, **kwargs):
        small_trainer(
            [sentinel], max_epochs=3, limit_train_batches=3, limit_val_batches=2, default_root_dir=tmp_path, **kwargs
        ).fit(Scripted(), DigitsDataModule())

    with pytest.raises(
        ValueError,
        match=r"monitor='val_los' was not logged by the end of epoch 0 \(did you mean "
        r"'val_loss'\?\); logged metrics are: val_acc, val_loss",
    ):
        run(LossDropSentinel(monitor="val_los"))
    with pytest.warns(PhaseWarning, match=r"monitor='val_los'.*did you mean 'val_loss'") as caught:
        run(LossDropSentinel(monitor="val_los", strict=False))
    assert sum("was not logged" in str(w.message) for w in caught) == 1


class ReturnsNothing(Scripted):
    """Manual optimization whose training_step returns None (allowed there): no loss reaches the callbacks."""

    def __init__(self):
        super().__init__(manual=True)

    @override
    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)


def test_a_training_step_that_returns_no_loss_is_reported_not_silently_unwatched(tmp_path):
    def run(sentinel):
        small_trainer(
            [sentinel], max_epochs=2, limit_train_batches=5, limit_val_batches=0, default_root_dir=tmp_path
        ).fit(ReturnsNothing(), DigitsDataModule())

    with pytest.raises(ValueError, match=r"monitor='loss' but training_step returned no loss tensor in epoch 0"):
        run(LossDropSentinel())
    with pytest.warns(PhaseWarning, match=r"set monitor='train_loss'") as caught:
        run(LossDropSentinel(strict=False))
    assert sum("returned no loss tensor" in str(w.message) for w in caught) == 1
    watched = LossDropSentinel()  # the same model returning its loss is watched, and nothing is said
    small_trainer([watched], max_epochs=2, limit_train_batches=5, limit_val_batches=0, default_root_dir=tmp_path).fit(
        Scripted(manual=True), DigitsDataModule()
    )
    assert watched.checked == 10 and watched.events == []


def test_the_sentinel_keeps_none_of_the_model_s_tensors_or_optimizers_after_fit(tmp_path):
    sentinel = LossDropSentinel()
    model = Scripted()
    small_trainer([sentinel], max_epochs=1, limit_train_batches=12, limit_val_batches=2, default_root_dir=tmp_path).fit(
        model, DigitsDataModule()
    )
    assert sentinel.checked == 12
    kept = [item for value in vars(sentinel).values() if isinstance(value, list | tuple) for item in value]
    assert not any(item is parameter for item in kept for parameter in model.parameters())
    assert not any(isinstance(item, torch.optim.Optimizer) for item in kept)


def test_a_monitor_logged_only_every_second_epoch_is_not_called_missing(tmp_path):
    sentinel = LossDropSentinel(monitor="val_loss")  # strict: a false "missing" would raise
    trainer = small_trainer(
        [sentinel],
        max_epochs=4,
        limit_train_batches=3,
        limit_val_batches=2,
        default_root_dir=tmp_path,
        check_val_every_n_epoch=2,
        num_sanity_val_steps=0,
    )
    trainer.fit(Scripted(), DigitsDataModule())
    assert sentinel.source == "validation" and sentinel.checked == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"on_violation": "stop"}, ValueError, "on_violation='stop' is not allowed"),
        ({"direction": "down"}, ValueError, "direction='down' is not allowed"),
        ({"window": -1}, ValueError, "window=-1 must be an integer > 0"),
        ({"check_every_n_steps": 0}, ValueError, "check_every_n_steps=0 must be an integer > 0"),
        ({"monitor": ""}, TypeError, "monitor='' must be 'loss' or the name of a logged metric"),
    ],
)
def test_bad_arguments(kwargs, error, needle):
    with pytest.raises(error) as info:
        LossDropSentinel(**kwargs)
    assert needle in str(info.value)


class ModularAddition(pl.LightningModule):
    """Grokking: an MLP memorises half of all (a + b) mod p pairs, then, under strong weight decay, generalises."""

    def __init__(self, p=53, width=128, lr=1e-2):
        super().__init__()
        self.embed = nn.Embedding(p, width // 2)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, p))
        self.lr = lr

    @override
    def forward(self, pairs):
        return self.mlp(self.embed(pairs).flatten(1))

    @override
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    @override
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))
        self.log("val_acc", (self(batch[0]).argmax(-1) == batch[1]).float().mean())

    @override
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1.0)


def modular_loaders(p=53, fraction=0.5, seed=0):
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    pairs, sums = torch.stack([a.reshape(-1), b.reshape(-1)], 1), (a + b).reshape(-1) % p
    order = torch.randperm(len(sums), generator=torch.Generator().manual_seed(seed))
    cut = int(fraction * len(sums))
    train, val = order[:cut], order[cut:]
    full_batch = lambda idx: torch.utils.data.DataLoader(  # noqa: E731
        torch.utils.data.TensorDataset(pairs[idx], sums[idx]), batch_size=len(idx)
    )
    return full_batch(train), full_batch(val)


def test_grokking_validation_loss_collapse_is_flagged_when_it_happens(tmp_path):
    pl.seed_everything(0)
    sentinel = LossDropSentinel(monitor="val_loss")
    trainer = small_trainer(
        [sentinel],
        max_epochs=1200,
        limit_train_batches=1.0,
        limit_val_batches=1.0,
        check_val_every_n_epoch=25,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    train, val = modular_loaders()
    trainer.fit(ModularAddition(), train, val)
    curve = dict(sentinel.curve)
    peak_step = max(curve, key=curve.get)
    [event] = sentinel.events
    assert event.kind == "loss_drop" and event.stage == "validate"
    assert curve[peak_step] > 4 and event.global_step > peak_step  # memorised first: validation loss peaked
    assert event.data["value"] < curve[peak_step] * 0.8  # flagged during the collapse ...
    assert curve[max(curve)] < 0.25 * event.data["value"]  # ... which went on for another factor of 4


def test_clean_validation_loss_is_silent(tmp_path):
    sentinel = LossDropSentinel(monitor="val_loss", direction="both")
    fit(sentinel, Scripted(), tmp_path, steps=-1, max_epochs=40, limit_train_batches=10, limit_val_batches=5)
    assert sentinel.events == [] and sentinel.checked == 40


class UnfreezeAt(Scripted):
    """Backbone frozen until ``step``, then unfrozen (the classic fine-tuning schedule)."""

    def __init__(self, step, **kwargs):
        super().__init__(**kwargs)
        self.unfreeze_step = step
        self.backbone.requires_grad_(False)

    @override
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)  # all params, so unfreezing lets them train

    @override
    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == self.unfreeze_step:
            self.backbone.requires_grad_(True)


def test_a_drop_coinciding_with_an_unfreeze_is_explained(tmp_path):
    sentinel = LossDropSentinel()
    fit(sentinel, UnfreezeAt(398, leak_label_from_step=400), tmp_path)
    [event] = sentinel.events
    assert event.kind == "loss_drop" and event.data["trainable_changed"] is True
    assert (event.data["trainable_old"], event.data["trainable_new"]) == (2, 6)
    assert event.data["lr_changed"] is False and "trainable parameters" in event.message


class UnfreezeIntoANewGroup(UnfreezeAt):
    """The optimizer holds the head only; at ``step`` the backbone joins it as a parameter group of its own, at
    the same learning rate (what Lightning's BackboneFinetuning does)."""

    @override
    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=3e-3)

    @override
    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == self.unfreeze_step:
            self.backbone.requires_grad_(True)
            self.trainer.optimizers[0].add_param_group({"params": list(self.backbone.parameters()), "lr": 3e-3})


def test_a_parameter_group_added_at_an_unfreeze_is_named_as_such_not_as_a_rate_change(tmp_path):
    """Found by a new user's trial with BackboneFinetuning: the added group read "a learning-rate change
    [0.001] -> [0.001, 0.001]" though no rate moved."""
    sentinel = LossDropSentinel()
    fit(sentinel, UnfreezeIntoANewGroup(398, leak_label_from_step=400), tmp_path)
    [event] = sentinel.events
    assert event.kind == "loss_drop" and event.data["lr_changed"] and event.data["trainable_changed"]
    assert "parameter groups added to the optimizer (learning rates [0.003] -> [0.003, 0.003])" in event.message
    assert "learning-rate change" not in event.message


class TeacherStudent(pl.LightningModule):
    """A student MLP learns a fixed teacher network's classes with SGD at a high learning rate, which keeps it
    jittering above what it could reach; a step schedule cuts the rate tenfold at ``cut_at`` (a real
    ``MultiStepLR``), and the validation loss falls by about 40% within a few validations.

    Args:
        cut_at: Global step of the cut; beyond the run for a clean one.
        cosine: Anneal the rate every step over ``cosine`` steps instead (a smooth schedule, no cut).
    """

    dim, batch = 32, 512

    def __init__(self, cut_at=1000, cosine=0):
        super().__init__()
        torch.manual_seed(0)
        self.teacher = nn.Sequential(nn.Linear(self.dim, 64), nn.Tanh(), nn.Linear(64, 10)).requires_grad_(False)
        for parameter in self.teacher.parameters():
            parameter.mul_(2)
        self.student = nn.Sequential(nn.Linear(self.dim, 256), nn.ReLU(), nn.Linear(256, 10))
        self.cut_at, self.cosine = cut_at, cosine
        self.inputs = torch.Generator().manual_seed(1)

    def labelled(self, x):
        return x, self.teacher(x).argmax(1)

    @override
    def training_step(self, batch, batch_idx):
        x, y = self.labelled(torch.randn(self.batch, self.dim, generator=self.inputs))  # a fresh sample each step
        return nn.functional.cross_entropy(self.student(x), y)

    @override
    def validation_step(self, batch, batch_idx):
        x, y = self.labelled(batch[0])
        self.log("val_loss", nn.functional.cross_entropy(self.student(x), y))

    @override
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.student.parameters(), lr=2.0, momentum=0.9)
        schedule = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.cosine)
            if self.cosine
            else torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[self.cut_at], gamma=0.1)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit_teacher_student(sentinel, model, tmp_path, steps=1300):
    pl.seed_everything(0)
    steps_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(steps, 1)))
    held_out = torch.randn(4096, TeacherStudent.dim, generator=torch.Generator().manual_seed(123))
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(held_out), batch_size=4096)
    trainer = small_trainer(
        [sentinel],
        max_steps=steps,
        limit_train_batches=1.0,
        limit_val_batches=1.0,
        val_check_interval=20,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, steps_loader, val_loader)
    return trainer


def test_a_learning_rate_cut_gives_an_explained_drop(tmp_path):
    sentinel = LossDropSentinel(monitor="val_loss", on_violation="raise", ignore_explained=True)
    fit_teacher_student(sentinel, TeacherStudent(cut_at=1000), tmp_path)  # explained: no raise
    [event] = sentinel.events
    assert event.kind == "loss_drop" and event.severity == "info" and event.stage == "validate"
    assert 1000 < event.global_step <= 1200 and event.data["change"] < -0.2
    assert event.data["lr_changed"] is True and event.data["trainable_changed"] is False
    assert event.data["lr_old"] == [pytest.approx(2.0)] and event.data["lr_new"] == [pytest.approx(0.2)]
    assert "learning-rate change [2.0] -> [0.2" in event.message


def test_the_same_run_without_the_cut_is_silent(tmp_path):
    sentinel = LossDropSentinel(monitor="val_loss", direction="both")
    fit_teacher_student(sentinel, TeacherStudent(cut_at=10**9), tmp_path)
    assert sentinel.events == [] and sentinel.checked == 1300 // 20


def test_a_smooth_schedule_does_not_explain_a_leak(tmp_path):
    sentinel = LossDropSentinel()
    model = Scripted(leak_label_from_step=400)
    model.configure_optimizers = lambda: {  # a long cosine schedule: the rate moves a little every step
        "optimizer": (optimizer := torch.optim.AdamW(model.parameters(), lr=3e-3)),
        "lr_scheduler": {
            "scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20_000),
            "interval": "step",
        },
    }
    fit(sentinel, model, tmp_path)
    [event] = sentinel.events
    assert event.kind == "loss_drop" and event.severity == "warning" and event.data["lr_changed"] is False
    assert 0.9 * 3e-3 < event.data["lr_new"][0] < 3e-3  # the rate did move, by less than 10%


class NegativeLoss(Scripted):
    """Returns the cross-entropy minus a constant, so that values cross below a declared floor of 0."""

    def __init__(self, shift):
        super().__init__()
        self.shift = shift

    @override
    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) - self.shift


def test_a_value_below_the_declared_floor_is_one_critical_impossible_loss_on_disk_before_the_raise(tmp_path):
    sentinel = LossDropSentinel(floor=0.0, on_violation="raise")
    with pytest.raises(LossDropDetected):
        fit(sentinel, NegativeLoss(shift=1.0), tmp_path, steps=200)
    [event] = sentinel.events
    assert event.kind == "impossible_loss" and event.severity == "critical" and event.data["floor"] == 0.0
    assert event.data["value"] < 0 and "below its declared floor 0" in event.message
    # the message names the step the value was logged at, and the check that judged it, when they differ
    first = min(step for step, value in sentinel.curve if value < 0)
    assert event.data["onset_step"] == first and f"at step {first}" in event.message
    assert first == event.global_step or f"(checked at step {event.global_step})" in event.message
    assert [e["kind"] for e in logged(tmp_path)] == ["impossible_loss"]


def test_without_a_floor_the_same_negative_values_are_judged_on_the_signed_scale(tmp_path):
    sentinel = LossDropSentinel(on_violation="raise")
    fit(sentinel, NegativeLoss(shift=1.0), tmp_path, steps=200)
    assert sentinel.events == [] and sentinel.detector is not None and sentinel.detector.scale == "signed"


def test_a_leak_that_first_raises_the_loss_is_triaged_against_a_reference_from_before_its_spike(tmp_path):
    """Found by a new user's trial: with gradient accumulation the leak first spikes the loss, and the drop's
    onset comes after the spike; a held-out reference taken between the two is already inside the event
    (it was, at step 310: "followed" -17%). The reference now predates a spike flagged within the drop's
    baseline."""
    sentinel = LossDropSentinel(direction="both", triage_every_n_steps=10)
    fit(
        sentinel,
        Scripted(leak_label_from_step=300),
        tmp_path,
        steps=450,
        noise=0.0,
        accumulate_grad_batches=4,
        limit_val_batches=3,
    )
    spike, drop = sentinel.events[:2]
    assert spike.kind == "loss_spike" and drop.kind == "loss_drop"
    assert spike.data["onset_step"] < drop.data["onset_step"]
    detail = drop.data["triage_detail"]
    assert detail["reference_step"] <= spike.data["onset_step"] and drop.data["triage"] == "train_only"
    assert detail["followed"] < -0.5  # the held-out loss rose while the training loss fell


class ClampedAtZero(Scripted):
    """Returns max(0, cross-entropy - 0.3): a hinge-like loss whose batches reach exactly 0 as it converges."""

    @override
    def training_step(self, batch, batch_idx):
        return torch.relu(super().training_step(batch, batch_idx) - 0.3)


@pytest.mark.parametrize("floor", [None, 0.0])
def test_an_exact_zero_without_a_floor_says_once_how_to_declare_one(tmp_path, floor):
    """Found by a new user's trial: a hinge loss without ``floor=0.0`` was silently judged on the signed scale
    from its first exact 0 on, where its leak to exact zeros went unflagged."""
    pl.seed_everything(0)
    sentinel = LossDropSentinel(floor=floor)
    trainer = small_trainer([sentinel], default_root_dir=tmp_path, max_steps=300, max_epochs=-1, limit_val_batches=0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", PhaseWarning)
        trainer.fit(ClampedAtZero(), DigitsDataModule(label_noise=0.0))
    assert sum(value == 0 for _, value in sentinel.curve) > 10
    hints = [str(w.message) for w in record if "exactly 0" in str(w.message)]
    if floor is None:
        assert len(hints) == 1 and "declare floor=0.0" in hints[0] and sentinel.detector.scale == "signed"
    else:
        assert hints == [] and sentinel.detector.scale == "log_above_floor"


def test_a_negative_loss_without_a_floor_gets_no_floor_hint(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", PhaseWarning)
        sentinel = LossDropSentinel()
        trainer = small_trainer([sentinel], default_root_dir=tmp_path, max_steps=100, max_epochs=-1)
        trainer.fit(NegativeLoss(shift=1.0), DigitsDataModule(label_noise=0.2))
    assert sentinel.detector.scale == "signed" and not any("exactly 0" in str(w.message) for w in record)


def test_window_and_persistence_reach_the_detector_and_change_when_the_leak_is_flagged(tmp_path):
    flagged = {}
    for window, persistence in [(12, 3), (12, 24), (64, 3)]:  # the window's effect: tests/detectors/test_change.py
        sentinel = LossDropSentinel(window=window, persistence=persistence, check_every_n_steps=1)
        fit(sentinel, Scripted(leak_label_from_step=300), tmp_path / f"{window}-{persistence}")
        assert (sentinel.detector.window, sentinel.detector.persistence) == (window, persistence)
        flagged[window, persistence] = [event.global_step for event in sentinel.events]
    quick = flagged[12, 3][0]
    assert 300 <= quick < 400
    assert flagged[12, 24] and flagged[12, 24][0] > quick  # more blocks must deviate: later


def test_each_mid_epoch_validation_value_is_judged_once_with_checkpointing_on(tmp_path):
    """A new tensor for the same validation value (ModelCheckpoint, val_check_interval) is not a new value."""
    sentinel = LossDropSentinel(monitor="val_loss")
    trainer = small_trainer(
        [sentinel],
        max_epochs=2,
        limit_train_batches=20,
        val_check_interval=5,
        num_sanity_val_steps=0,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    trainer.fit(Scripted(), DigitsDataModule())
    assert sentinel.source == "validation" and sentinel.checked == 8  # 4 validations per epoch, 2 epochs


class LogsEveryFifthStep(Scripted):
    """Logs ``dense`` at every step and ``sparse`` only at every fifth step."""

    @override
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("dense", loss.detach())
        if self.global_step % 5 == 0:
            self.log("sparse", loss.detach() * 2)
        return loss


def test_a_metric_logged_every_fifth_step_is_judged_once_per_log(tmp_path):
    """Lightning hands out a new tensor for the same stale value at every batch: it is not a new value."""
    sentinel = LossDropSentinel(monitor="sparse")
    trainer = small_trainer([sentinel], max_steps=60, max_epochs=-1, limit_train_batches=1.0, default_root_dir=tmp_path)
    trainer.fit(LogsEveryFifthStep(), DigitsDataModule())
    assert sentinel.source == "step" and sentinel.checked == 12
    assert [step for step, _ in sentinel.curve] == list(range(1, 60, 5))  # global_step after each logging step
