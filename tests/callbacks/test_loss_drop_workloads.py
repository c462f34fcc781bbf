"""LossDropSentinel at its defaults on real Trainer runs of the workloads the labelled corpus holds.

One run per case the issue names: a first descent lasting thousands of steps (silent), a late leak into an
already small and noisy loss (flagged within 100 steps; of every label, and of 97% of them), grokking's
validation collapse seen every step and every 100 steps (flagged during the collapse), a Gaussian NLL
crossing 0 (silent) and a drop of an always-negative one (flagged, on the signed scale). Two of them are
targets the detector does not meet yet (the README's known limits: the 97% leak, grokking every 100 steps):
they are strict expected failures, so the day one passes, the suite says so.
The phase change and the triage are in ``test_loss_drop_triage.py``; the whole corpus with baselines is
scored by ``benchmarks/loss_drop.py``.
"""

import statistics
import warnings

import lightning.pytorch as pl
import pytest
import torch
from digits import LEAK_PIXELS, DigitsDataModule
from helpers import small_trainer
from test_loss_drop import ModularAddition, Scripted, modular_loaders
from torch import nn
from typing_extensions import override
from workloads import (
    GaussianRegression,
    LinearDigits,
    PlainDigits,
    digits_loader,
    gaussian_loader,
    unshuffled_mix_loaders,
)

from lightning_phases import LossDropSentinel, PhaseWarning


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these small models' steps are up to 10x slower when two threads fight for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pl.seed_everything(0)
    yield
    torch.set_num_threads(threads)


def run(sentinel, model, tmp_path, train, val=None, **options):
    settings = dict(max_epochs=-1, limit_train_batches=1.0, limit_val_batches=0, default_root_dir=tmp_path)
    settings.update(options)
    trainer = small_trainer([sentinel], **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer.fit(model, train, val)
    return dict(sentinel.curve)


def test_no_flag_through_a_first_descent_of_thousands_of_steps(tmp_path):
    sentinel = LossDropSentinel(direction="both")
    curve = run(sentinel, LinearDigits(lr=1e-2), tmp_path, digits_loader(256, label_noise=0.3), max_steps=2500)
    start, middle, end = (statistics.median(curve[s] for s in range(a, a + 50)) for a in (1, 975, 2450))
    assert start - middle > 0.5 * (start - end) and middle - end > 0.15 * (start - end)  # still descending at 1000
    assert sentinel.events == []


class LeakIntoMost(Scripted):
    """The label leaks into 97% of the training samples from ``leak_label_from_step`` on (the rest stay noisy)."""

    @override
    def leak(self, batch):
        x, y = batch
        if self.global_step < self.hparams.leak_label_from_step or not self.trainer.training:
            return x, y
        x = x.clone()
        keep = torch.rand(len(y)) < 0.97
        leaked = nn.functional.one_hot(y, 10).to(x.dtype) * 4
        x[:, LEAK_PIXELS] = torch.where(keep[:, None], leaked, x[:, LEAK_PIXELS])
        return x, y


LEAK_INTO_MOST = pytest.mark.xfail(
    strict=True, reason="a known miss, in the README's known limits: this late 97% leak is not flagged"
)


@pytest.mark.parametrize(
    ("model", "spread"),
    [(Scripted, 5), pytest.param(LeakIntoMost, 3, marks=LEAK_INTO_MOST)],
    ids=["every label", "97% of them"],
)
def test_a_late_leak_into_a_small_noisy_loss_is_flagged_within_100_steps(tmp_path, model, spread):
    sentinel = LossDropSentinel()
    data = DigitsDataModule(label_noise=0.02)
    curve = run(sentinel, model(leak_label_from_step=1000), tmp_path, data, max_steps=1300)
    before = sorted(curve[s] for s in range(900, 1000))
    assert before[50] < 0.1 and before[90] > spread * before[10]  # already small, and noisy from batch to batch
    [event] = sentinel.events
    assert event.kind == "loss_drop" and 1000 <= event.global_step <= 1100


GROKKING_EVERY_100 = pytest.mark.xfail(
    strict=True, reason="a known miss, in the README's known limits: 16 values, the first already the peak"
)


@pytest.mark.parametrize("every", [1, pytest.param(100, marks=GROKKING_EVERY_100)])
def test_grokking_is_flagged_during_its_validation_collapse_seen_every_step_or_every_100(tmp_path, every):
    sentinel = LossDropSentinel(monitor="val_loss")
    train, val = modular_loaders()
    curve = run(
        sentinel,
        ModularAddition(),
        tmp_path,
        train,
        val,
        max_epochs=1200,
        limit_val_batches=1.0,
        check_val_every_n_epoch=every,
        num_sanity_val_steps=0,
    )
    peak_step = max(curve, key=curve.get)
    assert curve[peak_step] > 4 and curve[max(curve)] < 0.1 * curve[peak_step]  # memorised, then generalised
    [event] = sentinel.events
    assert event.kind == "loss_drop" and event.global_step > peak_step
    assert curve[event.global_step] > curve[max(curve)] * 3  # during the collapse, not after it


def test_a_gaussian_nll_crossing_zero_is_silent(tmp_path):
    sentinel = LossDropSentinel(direction="both")
    curve = run(sentinel, GaussianRegression(), tmp_path, gaussian_loader(2000, 64), max_steps=2000)
    assert curve[1] > 0.5 and min(curve.values()) < -1.0  # it crossed 0 on its way down
    assert sentinel.events == []


def test_a_drop_of_an_always_negative_loss_is_flagged_on_the_signed_scale(tmp_path):
    sentinel = LossDropSentinel()
    curve = run(sentinel, GaussianRegression(leak_from=1500), tmp_path, gaussian_loader(2500, 256), max_steps=2500)
    before, after = (
        statistics.median(curve[s] for s in range(1400, 1500)),
        statistics.median(curve[s] for s in range(2400, 2500)),
    )
    assert max(curve[s] for s in range(1300, 1500)) < 0 and after < before - 1.5  # negative before, far lower after
    drops = [event for event in sentinel.events if event.global_step >= 1500]
    assert [event.kind for event in drops] == ["loss_drop"] and drops[0].global_step <= 1550
    assert drops[0].data["scale"] == "signed" and drops[0].data["difference"] < -0.3


class SmallCNN(pl.LightningModule):
    """A new user's CNN (two 3x3 convolutions of ``channels``, max-pooling), SGD with momentum at ``lr``."""

    def __init__(self, lr: float = 0.05, channels: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, channels[0], 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels[0], channels[1], 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(channels[1] * 16, 10),
        )

    @override
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    @override
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_cnn_whose_loss_sits_at_ln10_then_falls_fast_is_not_flagged(tmp_path, seed):
    """Found by a new user's trial (both seeds were flagged at step 40): the loss stays near ln 10 for about 25
    steps, then falls 80% within 20. That is the first descent, slowly started."""
    from sklearn.datasets import load_digits

    pl.seed_everything(seed, verbose=False)
    images, labels = load_digits(return_X_y=True)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:1400]
    x, y = torch.tensor(images, dtype=torch.float32)[order] / 16, torch.tensor(labels)[order]
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    sentinel = LossDropSentinel(direction="both")
    curve = run(sentinel, SmallCNN(), tmp_path, train, max_steps=200)
    assert curve[1] > 2.2 and statistics.median(curve[s] for s in range(150, 200)) < 0.5  # it did fall
    assert sentinel.events == []


SLOW_START_OF_THE_SMALL_CNN = pytest.mark.xfail(
    strict=True,
    reason="a known false alarm, in the README's known limits: the loss sits within 5% of ln 10 for 150-200 "
    "steps, then collapses; a plateau that long is not told from a stuck run that starts learning",
)


@pytest.mark.parametrize(
    ("model", "batch_size", "seed"),
    [
        *[("wider", batch_size, seed) for batch_size in (16, 64) for seed in range(3)],
        pytest.param("small", 64, 0, marks=SLOW_START_OF_THE_SMALL_CNN),
    ],
)
def test_a_cnn_whose_first_descent_under_sgd_starts_slowly_and_gathers_speed_is_not_flagged(
    tmp_path, model, batch_size, seed
):
    """Found by the fourth new user's trial (CNNs under SGD with momentum at low learning rates, 13 of 30 runs
    flagged at steps 80-210): the loss falls a few percent over the first 60-150 steps, ever faster, then
    collapses. Seen over its own window, the slow start looked like a plateau; a plateau a drop leaves after a
    flat start must now be flat over the whole span of the evidence."""
    pl.seed_everything(seed, verbose=False)
    sentinel = LossDropSentinel(direction="both")
    # the fourth trial's CNN (16 and 32 channels), and the smaller one above
    network = SmallCNN(lr=0.003, channels=(16, 32) if model == "wider" else (8, 16))
    curve = run(sentinel, network, tmp_path, digits_loader(batch_size, 0.0, seed), max_steps=400)
    start, late = (statistics.median(curve[s] for s in range(a, a + 20)) for a in (1, 380))
    assert start > 2.2 and late < 0.5 * start  # it did fall, after a slow start
    assert sentinel.events == []


class OneCycleMLP(pl.LightningModule):
    """A fifth new user's MLP (64-128-128-10, GELU) under Adam and OneCycle (peak 3e-3 at 30% of 1,205 steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))

    @override
    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    @override
    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    @override
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=1205)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@pytest.mark.parametrize("seed", [0, 1])
def test_a_first_descent_that_a_warm_up_lets_begin_after_a_flat_start_is_recorded_not_acted_on(tmp_path, seed):
    """Found by the fifth new user's trial (flagged at steps 131-140 on 3 runs): on 30% noisy labels the loss
    sits near ln 10 while OneCycle's rate is small, then falls 30% as the rate grows. Decided while the detector
    was armed only provisionally and explained by the rate's change, it is taken as the first descent: an info
    event, and no action (here, no raise)."""
    pl.seed_everything(seed, verbose=False)
    sentinel = LossDropSentinel(on_violation="raise")
    validation = digits_loader(128, 0.0, seed + 10)
    curve = run(
        sentinel, OneCycleMLP(), tmp_path, digits_loader(32, 0.3, seed), validation, max_steps=300, limit_val_batches=2
    )
    start, late = (statistics.median(curve[s] for s in range(a, a + 20)) for a in (1, 280))
    assert start > 2.2 and late < 0.8 * start  # the first descent came
    drops = [event for event in sentinel.events if event.kind == "loss_drop"]
    assert drops and all(event.severity == "info" for event in drops)
    assert all(event.data["provisional"] and event.data["triage"] == "explained" for event in drops)
    assert all(
        event.data["triage_detail"]["held_out_after"] < event.data["triage_detail"]["held_out_before"]
        for event in drops
    )
    assert all("taken as the first descent" in event.message for event in drops)
    [row] = sentinel.phase_observations()  # the report says nothing was acted on
    assert row.verdict == "recorded, not acted on" and f"({len(drops)} of them info events" in row.detail


@pytest.mark.parametrize("seed", [0, 1])
def test_a_loss_that_changes_with_the_data_order_every_epoch_is_not_flagged_but_a_leak_still_is(tmp_path, seed):
    """Training data read in order, not shuffled: the first half of each epoch's batches has its labels, the
    second half random ones, so the loss falls and rises at the same batches every epoch. Without the epoch
    (before this was built) that was a flag every other epoch (20 in 2,000 steps). Each change is compared with
    the same steps one epoch earlier: the first of each kind is an info event saying the data order repeats,
    the rest are counted. A leak at step 1,200 is still a drop, flagged within 60 steps, ``train_only``."""
    train, val = unshuffled_mix_loaders(seed)
    options = dict(max_steps=2000, limit_val_batches=1.0, check_val_every_n_epoch=1000, num_sanity_val_steps=0)
    clean = LossDropSentinel(direction="both")
    run(clean, PlainDigits(), tmp_path / "clean", train, val, **options)
    assert clean.events and all(event.severity == "info" and event.data["recurring"] for event in clean.events)
    assert len({event.kind for event in clean.events}) == len(clean.events)  # one info event per kind
    assert sum(clean.recurring.values()) >= 20 and all(event.data["period"] == 47 for event in clean.events)
    assert "recur at the same steps of every epoch" in clean.phase_observations()[0].detail
    leaked = LossDropSentinel(direction="both")
    run(leaked, PlainDigits(leak_from=1200), tmp_path / "leak", train, val, **options)
    warnings_after = [event for event in leaked.events if event.severity == "warning" and event.global_step >= 1200]
    drop = next(event for event in warnings_after if event.kind == "loss_drop")
    assert drop.global_step <= 1260 and drop.data["triage"] == "train_only"
    assert not [event for event in leaked.events if event.severity == "warning" and event.global_step < 1200]


def test_a_stream_without_a_length_whose_order_repeats_is_judged_on_the_epoch_it_measured(tmp_path):
    """The same data as an IterableDataset without a length: the Trainer cannot say how long an epoch is, so
    the sentinel measures it (steps between two epoch starts). Before, with no period, it warned 24 times in
    a trial's 1,500 steps of such a stream; now changes that recur are counted, and at most the first one, in
    the second epoch, whose first-epoch match the early descent hides, can be a warning."""
    train, val = unshuffled_mix_loaders(0, stream=True)
    options = dict(max_steps=2000, limit_val_batches=1.0, check_val_every_n_epoch=1000, num_sanity_val_steps=0)
    sentinel = LossDropSentinel(direction="both")
    run(sentinel, PlainDigits(), tmp_path, train, val, **options)
    warned = [event for event in sentinel.events if event.severity != "info"]
    assert len(warned) <= 1 and all(event.global_step < 2 * 47 for event in warned)
    assert sum(sentinel.recurring.values()) >= 20
    assert all(event.data["period"] == 47 for event in sentinel.events if event.data.get("recurring"))
