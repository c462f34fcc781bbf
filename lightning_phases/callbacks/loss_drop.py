"""``LossDropSentinel``: catches sudden drops (and spikes) in a loss or any logged metric."""

import importlib.util
import math
import statistics
from collections import deque
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_phases.callbacks.base import PhaseCallback
from lightning_phases.callbacks.held_out import HeldOutProbe, looks_like_score
from lightning_phases.detectors.change import DropDetector, Verdict
from lightning_phases.detectors.triage import expected_held_out, judge_drop
from lightning_phases.exceptions import LossDropDetected, PhaseUsageError
from lightning_phases.phases import PhaseTable, Stage
from lightning_phases.reporting.events import PhaseEvent
from lightning_phases.reporting.names import key_segment
from lightning_phases.reporting.plots import plot_series
from lightning_phases.reporting.report_model import Observation
from lightning_phases.validation import (
    NonNegativeInt,
    OpenUnitFloat,
    PositiveFloat,
    PositiveInt,
    check_bool,
    check_choice,
    check_number,
    check_path,
    check_positive,
    check_text,
    suggestion,
)

OnViolation = Literal["warn", "checkpoint", "suspend", "raise"]
CURVE_POINTS = 5000  # the last values kept for the report's plot (and in checkpoints)
# A learning rate counts as changed once some param group's rate moved by more than LR_CHANGE (relative)
# within LR_SPAN training steps: a step cut, a restart, a warm-up's first steps or a schedule's last ones do;
# the steady moves of a cosine, linear or one-cycle schedule (a few tenths of a percent per step) do not,
# however far they add up over a drop's baseline.
LR_CHANGE = 0.1
LR_SPAN = 8
# rate changes kept: enough to hold the rates in force LR_SPAN steps ago when they change at every step
_RATE_CHANGES_KEPT = LR_SPAN + 2


class LossDropSentinel(PhaseCallback):
    """Catch sudden drops (and, if asked, spikes) in the training loss or any logged metric.

    Each value is judged with its training step by a robust, trend-aware, multi-scale detector
    (:class:`lightning_phases.detectors.change.DropDetector`): at every time scale from one step to
    thousands, the newest blocks' median against a Theil-Sen line through the blocks before, in log space
    for positive values and in the values' own units once a value <= 0 appears, with no warm-up count: drops
    are judged once the early descent stops speeding up, so it is never flagged, however long it lasts, and
    neither are ordinary noise or a spike's way back. A value below a declared ``floor`` is a critical
    ``impossible_loss`` event whatever the detector thinks. A flagged drop says what coincided with it, within the
    detection window: a change of any optimizer param group's learning rate by more than 10% within 8 steps (a
    step cut, a restart; not the steady moves of a cosine or one-cycle schedule), or of the set of trainable
    parameters (an unfreeze), and a triage says which kind of drop it is: ``explained`` (by those changes, and
    the held-out loss did not contradict them), ``generalizes`` (a held-out loss fell with it: the model got
    more capable), ``train_only`` (the held-out loss did not follow: suspect a label leak, memorisation or a
    data bug, whatever coincided with it), or ``impossible`` (below ``floor``).
    The held-out loss is the module's own ``validation_step`` on a few validation batches cached when fitting
    starts, evaluated in eval mode without gradients at each flag and, as the reference before a drop, at
    sparse steps (doubling from the start of fitting, then every ``triage_every_n_steps``). Values are kept on
    the device and checked every ``check_every_n_steps`` steps, averaged over all ranks first, so every rank
    makes the same decision with one host synchronisation per check.

    Args:
        monitor: ``"loss"``: the loss returned by ``training_step`` (automatic or manual optimization; with
            gradient accumulation, the mean over the micro-batches of each optimizer step). Any other name: a metric in
            ``trainer.callback_metrics``, checked after each training batch if it is logged per step, or when
            validation ends if it is logged in validation.
        direction: ``"drop"``, ``"spike"`` or ``"both"``.
        on_violation: What a flagged drop or spike does besides its event (a ``warning``, ``critical`` where
            the declared failure cost is high, and a W&B alert): ``"warn"`` nothing more; ``"checkpoint"``
            saves a full checkpoint named after the step; ``"suspend"`` checkpoints, then stops cleanly
            (resuming from that checkpoint with ``ckpt_path`` continues without flagging the same drop again);
            ``"raise"`` checkpoints, then raises ``LossDropDetected``. Non-finite values are always an event.
        strict: When the monitored metric has not been logged (or, for ``"loss"``, ``training_step`` returned
            no loss tensor) by the end of a training epoch in which validation ran (or of the first epoch,
            when there is no validation), raise a ``ValueError`` that lists the logged metrics; ``False``
            warns once instead (as ``EarlyStopping(strict=...)``).
        threshold: How many standard errors a change must exceed: of the recent blocks' median and of the
            forecast line read ahead of its baseline (both from the robust spread of blocks at the same time
            scale).
        min_change: Smallest relative change that counts, e.g. ``0.2``: 20% below (or above) the forecast.
        window: Blocks each time scale's forecast and noise are fitted on (at least 4).
        persistence: Newest blocks whose median must deviate (more where they hold fewer than 8 values); the
            detection delay is about this many blocks of the time scale that decides.
        floor: A lower bound the monitored value cannot cross when the code is right (``0.0`` for a
            cross-entropy or an MSE); the first value below it is a ``critical`` ``impossible_loss`` event,
            then the ``on_violation`` action. Changes are then judged in ``log(value - floor)``, measured
            from a tenth of the typical distance above the floor once a value lies exactly at it (a hinge
            loss' zeros); a drop found there is not checked again in the values' own units (a series heading
            for a bound it cannot cross is collapsing, not about to cross it). ``None`` declares no bound.
        check_every_n_steps: Training steps between checks of per-step values; between checks values stay on
            the device with no host synchronisation. Validation values are checked when validation ends.
        cooldown: Values after a flagged event during which no other event of the same kind is raised.
        ignore_explained: Turn drops explained by a learning-rate or trainable-set change (triage
            ``explained``: not ``train_only``) and spikes coinciding with one into ``info`` events with no action.
            (An explained drop decided after a flat start, while the first descent may still be to come, is such
            an event whatever this says: the first descent a warm-up let begin.)
        triage_batches: Validation batches cached when fitting starts for the triage of training-loss drops
            (on each rank, on its device); ``0`` turns the held-out evaluation off, and a drop's triage is then
            ``explained`` or ``unknown``.
        triage_every_n_steps: Most training steps between two reference evaluations of the held-out batches
            (after the first at fitting start they double: 10, 20, 40, ... steps apart, up to this). A drop is
            compared with the last reference before its onset, so a larger value is cheaper and compares over
            a longer stretch of ordinary training.
        triage_metric: What ``validation_step`` gives as the held-out loss: a name it logs (e.g.
            ``"val/nll"``; a scalar, or a torchmetrics ``Metric`` whose value over the cached batches is taken);
            ``None``: the logged name that says ``loss`` (``val_loss`` first, else the only one), else what it
            returns (a dict's ``"loss"``, or a scalar). It must be the same kind of loss as the monitored
            value, so their changes compare; a name that says a score (``val_acc``, ``val/f1``) is refused.
        checkpoint_dir: Where ``checkpoint``/``suspend``/``raise`` save; default
            ``<default_root_dir>/phase_checkpoints``.
        name: This instance's name in events, metric keys, alerts, plots and report rows; by default the class
            name, or ``LossDropSentinel-<monitor>`` when a Trainer holds several.
    """

    violation_choices: ClassVar[tuple[str, ...]] = ("warn", "checkpoint", "suspend", "raise")
    violation_error = LossDropDetected

    def __init__(
        self,
        monitor: str = "loss",
        direction: Literal["drop", "spike", "both"] = "drop",
        on_violation: OnViolation = "warn",
        strict: bool = True,
        threshold: PositiveFloat = 6.0,
        min_change: OpenUnitFloat = 0.2,
        window: PositiveInt = 12,
        persistence: PositiveInt = 3,
        floor: float | None = None,
        check_every_n_steps: PositiveInt = 10,
        cooldown: NonNegativeInt = 50,
        ignore_explained: bool = False,
        triage_batches: NonNegativeInt = 4,
        triage_every_n_steps: PositiveInt = 200,
        triage_metric: str | None = None,
        checkpoint_dir: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(on_violation=on_violation, name=name)
        self.monitor = check_text("monitor", monitor, "'loss' or the name of a logged metric")
        self.direction = check_choice("direction", direction, ("drop", "spike", "both"))
        self.strict = check_bool("strict", strict)
        self.detector_options: dict[str, Any] = {
            "threshold": check_positive("threshold", threshold),
            "min_change": check_number(
                "min_change", min_change, low=0, low_inclusive=False, high=1, high_inclusive=False
            ),
        }
        self.detector_options["window"] = check_positive("window", window, integer=True)
        self.detector_options["persistence"] = check_positive("persistence", persistence, integer=True)
        self.floor = None if floor is None else check_number("floor", floor)
        self.detector_options["floor"] = self.floor
        DropDetector(direction=self.direction, **self.detector_options)  # their combination is valid
        self.check_every_n_steps = check_positive("check_every_n_steps", check_every_n_steps, integer=True)
        self.cooldown = check_positive("cooldown", cooldown, allow_zero=True, integer=True)
        self.ignore_explained = check_bool("ignore_explained", ignore_explained)
        self.triage_batches = check_positive("triage_batches", triage_batches, allow_zero=True, integer=True)
        self.triage_every_n_steps = check_positive("triage_every_n_steps", triage_every_n_steps, integer=True)
        self.triage_metric = (
            None
            if triage_metric is None
            else check_text("triage_metric", triage_metric, "None or the name validation_step logs the loss under")
        )
        if self.triage_metric is not None and looks_like_score(self.triage_metric):
            raise ValueError(
                f"triage_metric={self.triage_metric!r} names a score (higher is better), but triage compares how far "
                "a held-out loss fell with how far the training loss did: a rising accuracy would read as a held-out "
                "loss that rose. Name the loss validation_step logs (e.g. 'val_loss'), or None to pick it."
            )
        self.probe = HeldOutProbe(self.triage_batches, self.triage_metric, "LossDropSentinel")
        self._references: deque[tuple[int, float]] = deque(maxlen=64)  # (step, held-out loss) before drops
        self._restored_triage: dict[str, Any] | None = None
        self._next_reference = 0
        self._fit_start_step = 0
        self.triaged: dict[str, int] = {}
        self.checkpoint_dir = check_path("checkpoint_dir", checkpoint_dir)
        self.detector: DropDetector | None = None
        self.source: str | None = None  # "step" or "validation", fixed by the first value
        self._pending: list[Tensor] = []
        self._pending_steps: list[int] = []
        self._accumulated: Tensor | None = None
        self._last_metric: Any = None
        self._seen_in: str | None = None  # where the monitored metric was first seen
        self._changes: deque[tuple[int, str, Any, Any]] = deque(maxlen=64)  # (step, what, before, after)
        # (step, rates) at each of the last changes of the rates, oldest first; the newest are the rates now
        self._rate_history: deque[tuple[int, tuple[float, ...]]] = deque(maxlen=_RATE_CHANGES_KEPT)
        self._last_trainable: int | None = None
        self._parameters: list[Tensor] = []  # the module's parameters, listed again at each training epoch
        self._optimizers: list[torch.optim.Optimizer] = []  # the Trainer's, listed again at each training epoch
        self._device = torch.device("cpu")  # the root device, read at each stage's start
        self._quiet_until: dict[str, int] = {}
        self.checked = 0
        self.curve: deque[tuple[int, float]] = deque(maxlen=CURVE_POINTS)
        self.flags: list[tuple[int, str, float]] = []
        self.unacted = 0  # flags recorded as info events, not acted on (explained; first descents)
        self.recurring: dict[str, int] = {}  # per event kind, changes that recur with the data order every epoch
        self._period: int | None = None  # training steps per epoch, where known (or measured, for a stream)
        self._epoch_started_at: int | None = None  # the global step the current training epoch started at
        self._validated_this_epoch = False

    @override
    def declared_stages(self, table: PhaseTable) -> tuple[Stage, ...]:
        return ("train", "validate")  # where values come from; the declared failure cost sets the severity

    @override
    def describe(self) -> str:
        return self.monitor

    @override
    def state_key_fields(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "direction": self.direction}

    # Collecting values --------------------------------------------------------------------------------

    @override
    def on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: Stage,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if stage != "train":
            return
        # this runs at every training step: each attribute read of the Trainer is made once
        step = trainer.global_step
        rates = self._current_rates()  # host-side floats, no sync; recorded only where they changed
        if not self._rate_history or rates != self._rate_history[-1][1]:
            self._note_rates(step, rates)
        if self.monitor == "loss":
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            value = loss if isinstance(loss, Tensor) else None
        else:
            value = self._metric_value(trainer)
        if value is not None:
            if value.requires_grad:  # its dtype, device and shape are settled at the check, for all at once
                value = value.detach()
            if self.monitor == "loss" and trainer.accumulate_grad_batches > 1:
                # Lightning divides each micro-batch loss by the accumulation count: their sum is the step's mean
                self._accumulated = value if self._accumulated is None else self._accumulated + value
                if (batch_idx + 1) % trainer.accumulate_grad_batches and not trainer.is_last_batch:
                    return
                value, self._accumulated = self._accumulated, None
            self._pending.append(value)
            self._pending_steps.append(step)
        if self._pending and (step % self.check_every_n_steps == 0 or trainer.is_last_batch):
            self._check(trainer, pl_module, "step", "train")

    def _note_rates(self, step: int, rates: tuple[float, ...]) -> None:
        """Take the learning rates of every param group now, ``rates``: a sudden change (by more than
        ``LR_CHANGE`` within ``LR_SPAN`` steps) is recorded with its step; a change still under way within
        ``LR_SPAN`` steps of the last one extends it. The optimizers are listed at each training epoch's start
        (their param groups are read live, so a group added mid-epoch counts)."""
        history = self._rate_history  # (step, rates) at each of the last changes of the rates
        if history and rates == history[-1][1]:
            return
        if history:
            before = history[0][1]  # the rates in force LR_SPAN steps ago (or the oldest kept)
            for changed_at, earlier in reversed(history):
                if changed_at <= step - LR_SPAN:
                    before = earlier
                    break
            if _rates_moved(before, rates):
                last = self._changes[-1] if self._changes else None
                if last is not None and last[1] == "lr" and last[0] >= step - LR_SPAN:
                    self._changes[-1] = (last[0], "lr", last[2], rates)
                else:
                    self._changes.append((step, "lr", before, rates))
            if history[-1][0] == step:  # another micro-batch of the same step (gradient accumulation)
                history.pop()
        history.append((step, rates))

    def _current_rates(self) -> tuple[float, ...]:
        """The learning rate of every param group of every optimizer, in order."""
        return tuple([float(group["lr"]) for optimizer in self._optimizers for group in optimizer.param_groups])

    def _note_trainable(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record a change of the number of trainable tensors (checked once per check, not per step; the
        parameters are listed again at each training epoch's start, where fine-tuning callbacks add some)."""
        if not self._parameters:
            self._parameters = list(pl_module.parameters())
        trainable = sum(1 for parameter in self._parameters if parameter.requires_grad)
        if self._last_trainable is not None and trainable != self._last_trainable:
            self._changes.append((trainer.global_step, "trainable", self._last_trainable, trainable))
        self._last_trainable = trainable

    def _metric_value(self, trainer: pl.Trainer) -> Tensor | None:
        """The monitored metric after a training batch, if it was logged there since the last value taken."""
        if self._source_of_metric() == "validation":  # a validation metric is taken at validation end only
            return None
        value = self._new_metric(trainer)
        if value is None:  # not logged since the last value, or logged at epoch level
            return None
        self._seen_in = "step"
        return value

    def _new_metric(self, trainer: pl.Trainer) -> Tensor | None:
        """The monitored metric if it was logged since the last value taken, else ``None``.

        ``trainer.callback_metrics`` hands out a new tensor object for the same logged value at every read
        (a detached view of Lightning's cached result), so identity cannot tell a fresh value from a stale one.
        Each ``self.log`` call stores a new tensor, though, and the view shares its memory: a value is new when
        its memory is not that of the last value taken (which is held, so its memory cannot be reused).
        """
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return None
        if not isinstance(value, Tensor):
            value = torch.tensor(float(value))
        last = self._last_metric
        if last is not None and value.device == last.device and value.data_ptr() == last.data_ptr():
            return None
        self._last_metric = value
        return value

    def _source_of_metric(self) -> str | None:
        """Where the monitored metric comes from, fixed by where it was first seen: ``"step"`` or ``"validation"``.

        A metric first seen at validation end is never read after a training batch (it would be counted again
        whenever the Trainer hands out a new tensor for the same value), and a per-step metric never at
        validation end.
        """
        return self.source or self._seen_in

    @override
    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        """Cache the held-out batches and evaluate the first reference, before the first training step."""
        self._device = trainer.strategy.root_device
        if stage != "train":
            return
        self._optimizers = list(trainer.optimizers)
        self._epoch_started_at = None
        self._references.clear()
        self._fit_start_step = self._next_reference = trainer.global_step
        self.probe.prepare(trainer)
        if not self.probe.available:
            return
        restored, self._restored_triage = self._restored_triage, None
        same = restored is not None and restored["fingerprint"] == self.probe.fingerprint()
        if trainer.world_size > 1:  # every rank holds other batches: keep the references only if all agree
            same = trainer.strategy.reduce_boolean_decision(same, all=True)
        if same:  # a resumed run with the same held-out batches goes on as if uninterrupted
            assert restored is not None
            self._references.extend((int(step), float(value)) for step, value in restored["references"])
            self._fit_start_step, self._next_reference = int(restored["start"]), int(restored["next"])
            self.probe.evaluations = int(restored["evaluations"])
            return
        try:
            self._take_reference(trainer, pl_module)
        except PhaseUsageError as error:
            if self.triage_metric is not None:  # asked for by name: a wrong name is an error, before training
                raise
            # Not every validation_step logs a loss (a sentinel on val_acc needs no triage): said at a drop.
            self._give_up_triage(str(error).split(": ", 1)[-1])

    def _give_up_triage(self, reason: str) -> None:
        self.probe.cached, self.probe.unavailable = [], reason

    def _take_reference(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate the held-out batches as a reference for later drops; the gaps double up to the maximum."""
        step = trainer.global_step
        value = self.probe.evaluate(trainer, pl_module)
        if not math.isfinite(value):  # the same on every rank: the evaluation is averaged over them
            self._give_up_triage(self.probe.failure or f"the held-out loss is {value}")
            return
        self._references.append((step, value))
        gap = max(self.check_every_n_steps, step - self._fit_start_step)
        self._next_reference = step + min(self.triage_every_n_steps, gap)

    @override
    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if stage == "train":
            if self._pending:  # a run that stopped between checks (max_steps, should_stop)
                self._check(trainer, pl_module, "step", "train")
            self._parameters, self._optimizers = [], []  # the module's tensors are not kept beyond the fit
        elif stage == "validate":
            self._validated_this_epoch = True
            self._validation_value(trainer, pl_module)

    def _validation_value(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor == "loss" or self._source_of_metric() == "step":
            return
        value = self._new_metric(trainer)
        if value is None:
            return
        self._seen_in = "validation"
        self._pending.append(_as_scalar(value, self._device))
        self._pending_steps.append(trainer.global_step)
        self._check(trainer, pl_module, "validation", "validate")

    @override
    def on_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        self._validated_this_epoch = False
        if stage == "train":
            self._parameters, self._optimizers = [], list(trainer.optimizers)
            # a change that comes at the same steps every epoch comes with the data order (a DataLoader that is
            # not shuffled): the detector compares each change with the same steps one epoch earlier
            batches = trainer.num_training_batches
            finite = isinstance(batches, int) or math.isfinite(batches)
            if finite and batches > 0:
                self._period = math.ceil(batches / trainer.accumulate_grad_batches)
            elif self._epoch_started_at is not None and trainer.global_step > self._epoch_started_at:
                self._period = trainer.global_step - self._epoch_started_at  # a stream without a length: as measured
            self._epoch_started_at = trainer.global_step
            if self.detector is not None and self.source == "step":
                self.detector.set_period(self._period)

    @override
    def on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        """A monitor never logged is judged missing once validation had its chance to log it; a training loss
        never returned, at the end of the first training epoch."""
        if self.monitor == "loss":
            if stage == "train" and self.source is None and not self._pending and self._accumulated is None:
                self._missing(
                    f"monitor='loss' but training_step returned no loss tensor in epoch {trainer.current_epoch} "
                    "(with manual optimization it may return None). Return the loss from training_step, or log it "
                    "(self.log('train_loss', loss)) and set monitor='train_loss'."
                )
            return
        if self.source is not None or self.monitor in trainer.callback_metrics:
            return
        if trainer.enable_validation and not self._validated_this_epoch:
            return  # validation did not run this epoch (check_val_every_n_epoch): it may log the metric later
        logged = sorted(trainer.callback_metrics)
        message = (
            f"monitor={self.monitor!r} was not logged by the end of epoch {trainer.current_epoch}"
            f"{suggestion(self.monitor, logged)}; logged metrics are: {', '.join(logged) or 'none'}. "
            f"Log it with self.log({self.monitor!r}, ...) or fix the name."
        )
        self._missing(message)

    def _missing(self, message: str) -> None:
        """Nothing to watch: raise (``strict``) or warn once. Every rank runs the same code and logs the same
        metrics, so every rank comes here alike."""
        if self.strict:
            raise PhaseUsageError(f"{self.name}: {message}")
        self.warn_once("missing monitor", message + " (strict=False: the sentinel watches nothing until it is)")

    # Checking -----------------------------------------------------------------------------------------

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, source: str, stage: Stage) -> None:
        if self.source is None:
            self.source = source
            self.detector = DropDetector(direction=self.direction, **self.detector_options)
            if source == "step":
                self.detector.set_period(self._period)
        device, pending, steps = trainer.strategy.root_device, self._pending, self._pending_steps
        self._pending, self._pending_steps = [], []
        if device.type == "cpu" and trainer.world_size == 1:  # nothing to synchronise with: each value is read
            floats = [value.item() if value.dtype is torch.float32 else float(value.float()) for value in pending]
        else:
            try:  # one stack, one conversion: the common case of same-shaped scalars on the device
                values = torch.stack(pending).to(device=device, dtype=torch.float32).reshape(-1)
            except RuntimeError:  # values restored from a checkpoint wait on the CPU; shapes [] and [1] mix
                values = None
            if values is None or values.numel() != len(pending):
                values = torch.stack([_as_scalar(v, device) for v in pending])
            values = trainer.strategy.reduce(values, reduce_op="mean") if trainer.world_size > 1 else values
            floats = values.tolist()  # the one host synchronisation of this check
        if source == "validation":
            self._note_rates(trainer.global_step, self._current_rates())
        self._note_trainable(trainer, pl_module)
        detector = self.detector
        assert detector is not None
        verdicts = []
        update, keep = detector.update, self.curve.append
        for value, step in zip(floats, steps, strict=True):
            positive = detector.all_positive
            verdict = update(value, step)
            if math.isfinite(value):
                keep((step, value))
            if value == 0 and positive and not detector.all_positive and self.floor is None:
                self._zero_without_floor(step)  # an exact 0 turned a positive loss into a signed one
            if verdict is not None:
                verdicts.append((verdict, detector.seen))
        self.checked += len(steps)
        # act only once every value of this check is in the state, so a checkpoint taken now resumes exactly
        for verdict, index in verdicts:
            self._flag(trainer, pl_module, verdict, stage, index)
        if self.probe.available and trainer.global_step >= self._next_reference:
            self._take_reference(trainer, pl_module)

    def _zero_without_floor(self, step: int) -> None:
        """A value of exactly 0 with no declared floor: from now on changes are judged in the values' own units."""
        self.warn_once(
            "zero without floor",
            f"{self.monitor} is exactly 0 at step {step} and no floor is declared, so it is judged in its own units "
            "from now on (as a signed loss). If 0 is a lower bound (a hinge loss, a cross-entropy), declare "
            "floor=0.0: a fall to 0 is then judged as one of about 10x.",
        )

    def _flag(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, verdict: Verdict, stage: Stage, index: int
    ) -> None:
        kind = {
            "drop": "loss_drop",
            "spike": "loss_spike",
            "non_finite": "non_finite_loss",
            "impossible": "impossible_loss",
        }[verdict.kind]
        if verdict.recurring:
            self._recurred(trainer, verdict, kind, stage)
            return
        if index < self._quiet_until.get(kind, -1):
            return
        self._quiet_until[kind] = index + self.cooldown
        data = self._data(verdict)
        if kind == "non_finite_loss":
            self.emit(
                trainer,
                kind,
                f"{self.monitor} is {verdict.value} at step {verdict.onset_step}{_checked_at(verdict, trainer)}",
                data,
                severity="warning",
                stage=stage,
            )
            return
        if kind == "impossible_loss":
            data["floor"] = self.floor
            data["triage"] = "impossible"
            self.triaged["impossible"] = self.triaged.get("impossible", 0) + 1
            message = (
                f"{self.monitor} is {verdict.value:.6g} at step {verdict.onset_step}{_checked_at(verdict, trainer)}, "
                f"below its declared floor {self.floor:g}: a bug in the loss or the data, not a capability "
                "(triage: impossible)"
            )
            self.flags.append((trainer.global_step, kind, verdict.value))
            if self.on_violation != "warn":
                data["checkpoint"] = self._save_checkpoint(trainer, kind)
            self.act(trainer, self.emit(trainer, kind, message, data, severity="critical", stage=stage))
            return
        data.update(self._explain(verdict.onset_step, verdict.block_steps))
        explained = data["lr_changed"] or data["trainable_changed"]
        triage = ""
        if kind == "loss_drop":
            data["triage"], data["triage_detail"], triage = self._triage(trainer, pl_module, verdict, explained)
            self.triaged[data["triage"]] = self.triaged.get(data["triage"], 0) + 1
        self.flags.append((trainer.global_step, kind, verdict.value))
        # a drop the held-out loss did not follow is train_only whatever coincided with it (a rate change does
        # not make the held-out loss rise): it is acted on
        quiet = self.ignore_explained and (data["triage"] == "explained" if kind == "loss_drop" else explained)
        # after a flat start, a drop that a learning-rate or trainable-set change explains (a warm-up that lets
        # the first descent begin) is taken as that first descent: recorded, not acted on
        first_descent = kind == "loss_drop" and verdict.provisional and data["triage"] == "explained"
        data["provisional"] = verdict.provisional
        quiet = quiet or first_descent
        if not quiet and self.on_violation != "warn":
            data["checkpoint"] = self._save_checkpoint(trainer, kind)
        message = f"{self.monitor} {_describe_change(verdict)} (now {verdict.level:.4g}, "
        message += f"last value {verdict.value:.4g}, score {verdict.score:.1f}, "
        message += f"threshold {verdict.threshold:g}, over blocks of {verdict.block_steps} step(s))"
        if explained:
            message += "; it coincides with " + " and ".join(data["explained_by"])
        message += triage
        if first_descent:
            message += "; after a flat start, taken as the first descent (recorded, not acted on)"
        if quiet:
            self.unacted += 1
            self.emit(trainer, kind, message, data, severity="info", stage=stage)
        else:
            self.violation(trainer, kind, message, data, stage=stage)

    def _data(self, verdict: Verdict) -> dict[str, Any]:
        """The numbers of a verdict, as an event's ``data``."""
        return {
            "monitor": self.monitor,
            "value": verdict.value,
            "forecast": verdict.forecast,
            "level": verdict.level,
            "score": verdict.score,
            "threshold": verdict.threshold,
            "change": verdict.change,
            "difference": verdict.difference,
            "onset_step": verdict.onset_step,
            "block_steps": verdict.block_steps,
            "scale": verdict.scale,
        }

    def _recurred(self, trainer: pl.Trainer, verdict: Verdict, kind: str, stage: Stage) -> None:
        """A change that came at the same steps one epoch earlier: the data order, not a sudden change. The first
        of each kind is an info event (it says the data comes in the same order every epoch); all are counted."""
        self.recurring[kind] = self.recurring.get(kind, 0) + 1
        if self.recurring[kind] > 1:
            return
        assert self.detector is not None
        data = self._data(verdict)
        data.update(recurring=True, period=self.detector.period)
        message = (
            f"{self.monitor} {_describe_change(verdict)} at step {verdict.onset_step}{_checked_at(verdict, trainer)}, "
            f"as it did at the same steps one epoch ({self.detector.period} steps) earlier: the training data seems "
            "to come in the same order every epoch (a DataLoader that is not shuffled, shards streamed in order) and "
            "this change with it, not a sudden one (recorded, not acted on; the later ones are counted in the report)"
        )
        self.emit(trainer, kind, message, data, severity="info", stage=stage)

    def _triage_onset(self, verdict: Verdict) -> int:
        """Where the drop's evidence began, or a spike flagged within its baseline (a leak that first raises the
        loss, then lowers it): a held-out reference taken after that is not from before the event."""
        assert self.detector is not None
        horizon = verdict.onset_step - self.detector.window * verdict.block_steps
        spikes = [
            int(event.data["onset_step"])
            for event in self.events
            if event.kind == "loss_spike" and horizon <= int(event.data["onset_step"]) < verdict.onset_step
        ]
        return min([verdict.onset_step, *spikes])

    def _triage(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, verdict: Verdict, explained: bool
    ) -> tuple[str, dict[str, Any], str]:
        """The drop's triage label, its numbers, and the sentence for the message.

        A drop of a validation metric is itself measured on held-out data: where the held-out batches cached at
        fitting start give that same metric, it is compared with them as a training value is (so a validation
        set that came to overlap the training data, whose loss falls while the batches cached from it at the
        start do not, is ``train_only``); otherwise it ``generalizes``. A drop of a per-step value is
        compared with the held-out loss evaluated now and at the last reference before the drop (before its
        onset, or a spike it came back from: a leak that first raises the loss). Both are taken net of the
        trend: the training loss' fall is the drop itself (its level against its forecast), and the held-out
        loss' is measured from where it would be now (:func:`expected_held_out`): moved since the reference as
        the training loss' forecast did (ordinary learning between an early reference and the drop is not the
        drop), or, where its own trend over its last two references was flatter (a model overfitting), on that
        trend, never above the reference.
        """
        if looks_like_score(self.monitor):  # higher is better: a sudden fall is a loss of performance
            label = "explained" if explained else "unknown"
            reason = (
                f"{self.monitor} is a score (higher is better): its drop is a loss of performance, not a capability "
                "jump; look at what changed in the model, the data or the code"
            )
            return label, {"basis": reason}, f"; triage: {label} ({reason})"
        validation = self.source == "validation"
        if validation and not (self.probe.available and self.probe.resolved == self.monitor and self._references):
            label = "explained" if explained else "generalizes"
            detail = {"basis": "the monitored value is measured on held-out data"}
            return label, detail, f"; triage: {label} (the monitored value is measured on held-out data)"
        if not self.probe.available:
            label = "explained" if explained else "unknown"
            reason = f"no held-out loss to compare: {self.probe.unavailable}"
            if not explained and self.triage_batches:
                self.warn_once("no triage", f"drops cannot be triaged, {reason}.")
            return label, {"basis": reason}, f"; triage: {label} ({reason})"
        after = self.probe.evaluate(trainer, pl_module)
        if not math.isfinite(after) or not self._references:
            reason = self.probe.failure or (f"the held-out loss is {after}" if not math.isfinite(after) else "")
            self._give_up_triage(reason or "no reference evaluation before the drop")
            return self._triage(trainer, pl_module, verdict, explained)
        onset = self._triage_onset(verdict)
        prior = [reference for reference in self._references if reference[0] <= onset] or [self._references[0]]
        before_step, before = prior[-1]
        train_before, train_after = self._train_level(before_step), self._train_level(trainer.global_step)
        expected, basis = expected_held_out(prior, train_before, verdict.forecast, trainer.global_step, self.floor)
        comparison = judge_drop(verdict.forecast, verdict.level, expected, after, self.floor)
        label = "explained" if explained and comparison.label != "train_only" else comparison.label
        detail = {
            "basis": "held-out batches evaluated with validation_step"
            + (", cached from the validation data when fitting started" if validation else ""),
            "held_out_metric": self.probe.resolved,
            "held_out_batches": len(self.probe.cached),
            "reference_step": before_step,
            "held_out_before": before,
            "held_out_expected": expected,
            "expected_on": basis,
            "held_out_after": after,
            "train_before": train_before,
            "train_forecast": verdict.forecast,
            "train_level": verdict.level,
            "train_after": train_after,
            "followed": comparison.followed,
            "scale": comparison.scale,
            "comparison": comparison.label,
        }
        sentences = {
            "generalizes": "the held-out loss fell with it: a capability jump",
            "train_only": "the held-out loss did not follow"
            + (", which the coinciding change does not explain" if explained else "")
            + ": suspect a label leak, memorisation or a data bug",
            "unknown": "the training loss did not fall since the reference",
            "explained": "see the coinciding change",
        }
        if validation:  # the monitored value is itself a held-out loss: the cached batches tell if the data changed
            sentences.update(
                generalizes="the validation batches cached when fitting started fell with it: a capability jump",
                train_only="the validation batches cached when fitting started did not follow: the validation "
                "data changed (a validation set that came to overlap the training data, a leak into it)",
                unknown=f"{self.monitor} did not fall since the reference",
            )
        words = sentences[label]
        numbers = (
            f"held-out {before:.4g} at step {before_step} -> {after:.4g}, {expected:.4g} expected on {basis}; "
            f"{self.monitor if validation else 'training'} {verdict.level:.4g} against its forecast "
            f"{verdict.forecast:.4g}"
        )
        if comparison.followed is not None:
            numbers += f", followed {comparison.followed:.0%}"
        return label, detail, f"; triage: {label}, {words} ({numbers})"

    def _train_level(self, step: int) -> float:
        """The median of the 16 checked values nearest to ``step``."""
        nearest = sorted(self.curve, key=lambda point: abs(point[0] - step))[:16]
        return statistics.median(value for _, value in nearest)

    def _explain(self, onset_step: int, block_steps: int) -> dict[str, Any]:
        """Learning-rate and trainable-set changes within the detection window, until now.

        The onset is where the evidence of the decision begins; a drop that unfolds over several values is
        decided some values after it began. Changes since ``window`` blocks of the deciding time scale before
        the onset (the span the forecast was fitted on) count as coinciding.
        """
        assert self.detector is not None
        since = onset_step - self.detector.window * block_steps
        recent = [change for change in self._changes if change[0] >= since]
        rates = [change for change in recent if change[1] == "lr"]
        trainable = [change for change in recent if change[1] == "trainable"]
        reasons = []
        if rates:
            old, new = list(rates[0][2]), list(rates[-1][3])
            if len(old) == len(new):
                reasons.append(f"a learning-rate change {old} -> {new} at step {rates[0][0]}")
            else:  # a fine-tuning callback adding the unfrozen backbone as a group of its own
                what = "added to" if len(new) > len(old) else "removed from"
                reasons.append(
                    f"parameter groups {what} the optimizer (learning rates {old} -> {new}) at step {rates[0][0]}"
                )
        if trainable:
            reasons.append(
                f"a change of the trainable parameters ({trainable[0][2]} -> {trainable[-1][3]} tensors) "
                f"at step {trainable[0][0]}"
            )
        current_rates = list(self._rate_history[-1][1]) if self._rate_history else []
        current_trainable = self._last_trainable
        return {
            "lr_changed": bool(rates),
            "lr_old": list(rates[0][2]) if rates else current_rates,
            "lr_new": list(rates[-1][3]) if rates else current_rates,
            "trainable_changed": bool(trainable),
            "trainable_old": trainable[0][2] if trainable else current_trainable,
            "trainable_new": trainable[-1][3] if trainable else current_trainable,
            "explained_by": reasons,
        }

    def _save_checkpoint(self, trainer: pl.Trainer, kind: str) -> str:
        directory = Path(self.checkpoint_dir or Path(trainer.default_root_dir) / "phase_checkpoints")
        path = directory / f"{kind}-{self.monitor.replace('/', '_')}-step{trainer.global_step}.ckpt"
        trainer.save_checkpoint(path)  # a collective in multi-process runs: every rank is here, by design
        return str(path)

    @override
    def act(self, trainer: pl.Trainer, event: PhaseEvent) -> None:
        if self.on_violation == "suspend":
            trainer.should_stop = True
        super().act(trainer, event)

    # Plot ---------------------------------------------------------------------------------------------

    @override
    def on_call_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException | None) -> None:
        """``<name>_<monitor>_curve.png`` beside the event log, with every flag marked; W&B image."""
        if not self.curve:
            return
        name = f"{key_segment(self.monitor)}_curve"
        title = f"{self.monitor}: {len(self.flags)} flag(s), {self.checked} values checked"
        path = self.reporter.save_plot(
            self.name, name, lambda path: plot_series(list(self.curve), self.flags, title, self.monitor, path)
        )
        if path is None and self.reporter.is_writer and importlib.util.find_spec("matplotlib") is None:
            self.warn_once(
                "no plot",
                "no plot written; install matplotlib (pip install 'lightning-phases[plot]') to get a PNG of the "
                "curve with its flags.",
            )

    # Checkpoint state ---------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        # The values still waiting for a check are kept too (one host synchronisation per checkpoint), with
        # what the explanations need, so a run resumed from a checkpoint saved between checks counts every value.
        return {
            "source": self.source,
            "detector": self.detector.state_dict() if self.detector else None,
            "quiet_until": dict(self._quiet_until),
            "checked": self.checked,
            "curve": list(self.curve),
            "flags": list(self.flags),
            "unacted": self.unacted,
            "recurring": dict(self.recurring),
            "pending": torch.stack(self._pending).tolist() if self._pending else [],
            "pending_steps": list(self._pending_steps),
            "changes": [list(change) for change in self._changes],
            "rate_history": [[step, list(rates)] for step, rates in self._rate_history],
            "last_trainable": self._last_trainable,
            "seen_in": self._seen_in,
            "triaged": dict(self.triaged),
            "triage_references": {
                "references": [list(reference) for reference in self._references],
                "start": self._fit_start_step,
                "next": self._next_reference,
                "fingerprint": self.probe.fingerprint() if self.probe.available else None,
                "evaluations": self.probe.evaluations,
            },
        }

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if trainer.world_size > 1 and self._pending and isinstance(state, dict):
            # rank 0's state is the one saved: it gets the mean over ranks, as the check would have taken.
            # Every rank is here (saving a checkpoint is collective), with as many waiting values.
            state["pending"] = trainer.strategy.reduce(torch.stack(self._pending), reduce_op="mean").tolist()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.source = state_dict["source"]
        self._quiet_until = dict(state_dict["quiet_until"])
        self.checked = int(state_dict["checked"])
        self.curve = deque((tuple(point) for point in state_dict["curve"]), maxlen=CURVE_POINTS)
        self.flags = [tuple(flag) for flag in state_dict["flags"]]
        self.unacted = int(state_dict.get("unacted", 0))
        self.recurring = {str(kind): int(count) for kind, count in state_dict.get("recurring", {}).items()}
        self._pending = [torch.tensor(value, dtype=torch.float32) for value in state_dict.get("pending", [])]
        self._pending_steps = [int(step) for step in state_dict.get("pending_steps", [])]
        self._changes = deque((tuple(change) for change in state_dict.get("changes", [])), maxlen=64)
        self._rate_history = deque(
            ((int(step), tuple(rates)) for step, rates in state_dict.get("rate_history", [])), maxlen=_RATE_CHANGES_KEPT
        )
        self._last_trainable = state_dict.get("last_trainable")
        self._seen_in = state_dict.get("seen_in")
        self.triaged = dict(state_dict.get("triaged", {}))
        restored = state_dict.get("triage_references")
        self._restored_triage = restored if restored and restored["fingerprint"] is not None else None
        if self.source is not None and state_dict["detector"] is not None:
            self.detector = DropDetector(direction=self.direction, **self.detector_options)
            self.detector.load_state_dict(state_dict["detector"])

    # Report -------------------------------------------------------------------------------------------

    @override
    def phase_observations(self) -> list[Observation]:
        if self.source is None:
            return []
        stage: Stage = "train" if self.source == "step" else "validate"
        drops = sum(kind == "loss_drop" for _, kind, _ in self.flags)
        spikes = sum(kind == "loss_spike" for _, kind, _ in self.flags)
        verdict = "flagged" if drops + spikes > self.unacted else "recorded, not acted on"
        verdict = verdict if drops + spikes else "no sudden change"
        detail = f"{self.checked} values of {self.monitor} checked, {drops} drops, {spikes} spikes"
        if self.unacted:
            detail += f" ({self.unacted} of them info events, not acted on)"
        if self.recurring:
            count = sum(self.recurring.values())
            detail += (
                f"; {count} {'change that recurs' if count == 1 else 'changes that recur'} at the same steps of "
                "every epoch (the data order) not flagged"
            )
        if self.triaged:
            detail += "; triage: " + ", ".join(f"{count} {label}" for label, count in sorted(self.triaged.items()))
        if self.probe.evaluations:
            detail += f"; {self.probe.evaluations} held-out evaluations of {len(self.probe.cached)} batches"
            detail += f" ({self.probe.resolved})" if self.probe.resolved else ""
        watched = {"drop": "drops", "spike": "spikes", "both": "drops and spikes"}[self.direction]
        return [Observation(stage, f"{self.monitor} watched for sudden {watched}", verdict, detail)]


def _as_scalar(value: Tensor, device: torch.device) -> Tensor:
    """A detached float scalar on ``device``, with no copy or dispatch where it already is one."""
    if value.requires_grad:
        value = value.detach()
    if value.dtype != torch.float32:
        value = value.float()
    if value.device != device:
        value = value.to(device)
    return value.reshape(()) if value.dim() else value


def _checked_at(verdict: Verdict, trainer: pl.Trainer) -> str:
    """`` (checked at step N)`` where the value was taken at an earlier step than the check that judged it."""
    return f" (checked at step {trainer.global_step})" if verdict.onset_step != trainer.global_step else ""


def _describe_change(verdict: Verdict) -> str:
    """``dropped 59% below the forecast 2.969`` on a log scale; in the values' own units on the signed scale."""
    word, side = ("dropped", "below") if verdict.kind == "drop" else ("spiked", "above")
    if verdict.scale == "signed":
        return f"{word} by {abs(verdict.difference):.4g} {side} the forecast {verdict.forecast:.4g}"
    return f"{word} {abs(verdict.change):.0%} {side} the forecast {verdict.forecast:.4g}"


def _rates_moved(before: tuple[float, ...], after: tuple[float, ...]) -> bool:
    """Whether some param group's learning rate moved by more than ``LR_CHANGE`` (or the groups changed)."""
    if len(before) != len(after):
        return True
    return any(abs(new - old) > LR_CHANGE * abs(old) for old, new in zip(before, after, strict=True))
