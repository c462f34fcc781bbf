"""``ShiftTracker``: how far, and how fast, the data moves away from the training reference."""

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from annotated_types import Ge
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from typing_extensions import override

from lightning_phases.callbacks.base import PhaseCallback
from lightning_phases.detectors.features import (
    Call,
    CallCodec,
    FeatureTap,
    ForwardRecorder,
    as_rows,
    batch_input,
    resolve_module,
)
from lightning_phases.detectors.reservoir import Reservoir
from lightning_phases.detectors.sequential import Alarm, StreamMonitor, knn_scores
from lightning_phases.detectors.two_sample import (
    TestResult,
    canonical_order,
    fit_reduction,
    ks_test,
    mmd_test,
    mmdagg_test,
)
from lightning_phases.exceptions import ShiftDetected
from lightning_phases.phases import STAGES, PhaseTable, Stage
from lightning_phases.reporting.console import logger
from lightning_phases.reporting.events import PhaseEvent
from lightning_phases.reporting.report_model import Observation
from lightning_phases.validation import (
    NonNegativeFloat,
    OpenUnitFloat,
    PositiveInt,
    Seed,
    check_bool,
    check_choice,
    check_choices,
    check_number,
    check_positive,
    check_seed,
)

TestName = Literal["mmdagg", "mmd", "ks"]
Reduction = Literal["pca", "random"]
FeatureFn = Callable[[Any, Any], torch.Tensor]

#: Pooled sample size from which the start of each MMD test is logged at INFO (it takes about a second).
LARGE_TEST = 4000

#: Rows per forward pass when the reference's features are recomputed with the current weights.
RECOMPUTE_CHUNK = 512


class ShiftTracker(PhaseCallback):
    """Calibrated two-sample tests of each stage's data against the training reference, and shift rates.

    During the reference stage (the stage the phase table declares ``data: reference``: the training data of the
    last training epoch, by default) a uniform reservoir sample of ``reference_size`` samples is kept. The
    stages declared ``held_out`` or ``live`` (``validate``, ``test``, ``predict`` by default) are tested against
    it; a stage declared ``fixed_shift`` (chosen to differ, e.g. a corrupted test set) is measured too, and its
    shift is reported as expected (an info event, no ``shift_detected``). When a tested stage ends, its samples
    (a reservoir of ``current_size``) are tested against the reference: by default an aggregated kernel MMD
    test (MMDAgg: Gaussian and Laplace kernels at several bandwidths, on raw and standardized features, the
    level held over the collection by the permutations themselves), every kernel and permutation in batched
    products, and for softmax outputs also per-dimension KS tests with Bonferroni. Long predict runs are also
    tested in sliding windows of ``window_size`` samples. Each test is a ``shift_test`` info event; a p-value
    below ``alpha`` (divided by the number of tests run together) is a ``shift_detected`` event.

    Features from a module (a submodule name or ``"output"``) are computed again on the reference *inputs*
    with the current weights at every test, so a reference taken while that module trained is never stale,
    and both sides are computed in the same (eval) mode. Under DDP each rank keeps
    ``reference_size / world_size`` reference samples and the samples are gathered before testing; tests
    see the rows in a canonical order, so the p-value on N processes equals the single-process one on the
    same samples and seed. A checkpoint holds every rank's reference rows (gathered when the reference stage
    ends), and each rank of a resumed run takes every ``world_size``-th of them, so a run resumed, tested or
    predicted on another number of processes tests against the same reference.

    In-fit validation also logs the shift distance (sqrt of MMD²) over time, its rate per optimizer step,
    the parameter update rate (relative norm of the change of the trainable parameters per step), the
    oversight interval (steps between validations) and the ratio of shift rate to update rate.

    Rows with a NaN or inf feature, in either sample, are dropped before testing and counted in one
    ``non_finite_features`` warning event per test that says how many of which sample; with fewer than 2
    finite rows left on a side the test is refused (no p-value; the event says so).

    A stage declared ``live`` (``predict``, by default) is also monitored sample by sample with an anytime-valid
    sequential test (``anytime_valid``): a betting martingale on conformal p-values of each sample against the
    reference (:class:`~lightning_phases.detectors.sequential.StreamMonitor`), whose chance of *ever* raising a
    false alarm over the stage's stream, however long it runs, is at most ``alpha / 2``; ``alpha / 2`` is left
    for the tests at the stage's end, so ``shift_detected`` in that stage has a chance of at most ``alpha`` of
    being false over the whole stream. Its alarm is a ``shift_detected`` event with ``"sequential": true``, the
    sample that raised it and the estimated detection delay (samples since the estimated start of the shift).

    Each test at ``alpha`` has probability ``alpha`` of a false alarm when nothing shifted, so repeated tests
    (one per validation) are counted: every ``shift_test`` event holds ``tests_so_far`` and the phase report
    gives the number of tests and the false alarms expected from them (``alpha`` x tests).

    Args:
        features: What is compared: ``"input"`` (the batch's input tensor, flattened), a submodule's name
            (its output, e.g. a backbone's last layer), ``"output"`` (the model's output; softmax over the last
            dimension for 2-d outputs when ``output_softmax``), or a callable ``(batch, outputs) -> Tensor``.
        reference_stage: The stage whose data is the reference (its last epoch's data, for ``train``);
            ``None`` (default): the one stage the phase table declares ``data: reference``.
        reference_size: Reference samples kept (at least 2).
        stages: Narrow the tested stages to these; ``None`` (default): every stage declared ``held_out``,
            ``live`` or ``fixed_shift`` (the sanity check is never tested: it runs before any reference).
        alpha: Significance level of a run of tests.
        tests: ``"mmdagg"`` (MMD aggregated over Gaussian and Laplace kernels at several bandwidths, on raw and
            standardized features: :func:`~lightning_phases.detectors.two_sample.mmdagg_test`), ``"mmd"``
            (one Gaussian kernel at the median-heuristic bandwidth) and/or ``"ks"``; by default
            ``["mmdagg"]``, plus ``"ks"`` when ``features="output"``.
        n_permutations: Permutations of the MMD test; the smallest p-value is ``1 / (1 + n_permutations)``.
        current_size: Samples of a tested stage kept (a reservoir); by default ``reference_size``.
        window_size: In ``predict``, also test every ``window_size`` samples; ``None``: only at the end.
        reduce: Reduce features to ``reduce_dim`` dimensions before testing: ``"pca"`` (fitted on
            both samples pooled, so the test stays calibrated) or ``"random"`` (a fixed projection);
            ``None`` keeps them.
        reduce_dim: Target dimension of ``reduce``.
        output_softmax: Softmax of 2-d outputs for ``features="output"``.
        track_rates: Log the shift, update and oversight rates in fit (keeps a copy of the trainable
            parameters, taken at each validation), and state them in the phase report.
        anytime_valid: Monitor stages declared ``live`` sample by sample with the anytime-valid sequential test
            (at ``alpha / 2``, the stage's end-of-stage tests at the other half); ``False``: only the
            end-of-stage (and window) tests, at ``alpha``.
        seed: Seed of the reservoirs, the permutations and the random projection.
        checkpoint_mb: At most this many MiB of reference rows go into each checkpoint (a uniform subsample
            of whole rows when the reference is larger, e.g. 1000 images of 3x64x64 are 47 MiB); ``0`` keeps
            the reference out of checkpoints (a resumed test then draws it from ``train_dataloader()``). The
            parameter copy of ``track_rates`` goes in too when it fits this bound (a resumed fit then measures
            the interval that was running; otherwise it skips that one interval).
        on_violation: What a detected shift (in a stage not declared ``fixed_shift``) does besides its
            ``shift_detected`` event: ``"warn"`` nothing more; ``"stop"`` stops ``fit`` cleanly after that
            validation (``trainer.should_stop``, as ``EarlyStopping``; outside ``fit`` the stage ends anyway
            and nothing more happens); ``"raise"`` raises ``ShiftDetected``. Every rank decides alike (the
            test runs on the gathered samples with the same seed).
        name: This instance's name in events, metric keys, tables, alerts and report rows; by default the
            class name, or ``ShiftTracker-<features>`` when a Trainer holds several.

    After each test, ``last_samples`` holds the ``(reference, current)`` rows it compared (gathered over
    ranks, reduced if ``reduce`` is set), and ``results`` every test's outcome.
    """

    violation_choices: ClassVar[tuple[str, ...]] = ("warn", "stop", "raise")
    violation_error = ShiftDetected
    declared_property: ClassVar[str] = "data"

    def __init__(
        self,
        features: str | FeatureFn = "input",
        reference_stage: Stage | None = None,
        reference_size: Annotated[int, Ge(2)] = 1000,
        stages: Sequence[Stage] | None = None,
        alpha: OpenUnitFloat = 0.05,
        tests: Sequence[TestName] | None = None,
        n_permutations: PositiveInt = 1000,
        current_size: PositiveInt | None = None,
        window_size: PositiveInt | None = None,
        reduce: Reduction | None = None,
        reduce_dim: PositiveInt = 32,
        output_softmax: bool = True,
        track_rates: bool = True,
        anytime_valid: bool = True,
        seed: Seed = 0,
        checkpoint_mb: NonNegativeFloat = 8.0,
        on_violation: Literal["warn", "stop", "raise"] = "warn",
        name: str | None = None,
    ) -> None:
        if not (callable(features) or (isinstance(features, str) and features)):
            raise TypeError(f"features={features!r} must be 'input', 'output', a module name or a callable.")
        self.features = features
        self._features_name = features if isinstance(features, str) else getattr(features, "__qualname__", "fn")
        self._reference_stage_arg: Stage | None = (
            None if reference_stage is None else check_choice("reference_stage", reference_stage, STAGES)
        )
        self.reference_stage: Stage = self._resolve_reference(PhaseTable())
        super().__init__(stages=stages, on_violation=on_violation, name=name)
        if self.requested_stages is not None and self.reference_stage in self.requested_stages:
            raise ValueError(
                f"reference_stage={self.reference_stage!r} cannot also be one of stages={list(self.requested_stages)}."
            )
        self.reference_size = check_number("reference_size", reference_size, low=2, integer=True)
        self.alpha = float(check_number("alpha", alpha, low=0, high=1, low_inclusive=False, high_inclusive=False))
        default_tests: tuple[str, ...] = ("mmdagg", "ks") if features == "output" else ("mmdagg",)
        self.tests = check_choices("tests", tests if tests is not None else default_tests, ("mmdagg", "mmd", "ks"))
        self.n_permutations = check_positive("n_permutations", n_permutations, integer=True)
        self.current_size = (
            reference_size if current_size is None else check_positive("current_size", current_size, integer=True)
        )
        self.window_size = None if window_size is None else check_positive("window_size", window_size, integer=True)
        self.reduce = None if reduce is None else check_choice("reduce", reduce, ("pca", "random"))
        self.reduce_dim = check_positive("reduce_dim", reduce_dim, integer=True)
        self.output_softmax = check_bool("output_softmax", output_softmax)
        self.track_rates = check_bool("track_rates", track_rates)
        self.anytime_valid = check_bool("anytime_valid", anytime_valid)
        self.seed = check_seed("seed", seed)
        self.checkpoint_mb = float(check_number("checkpoint_mb", checkpoint_mb, low=0))

        self._reference: Reservoir | None = None
        self._reference_all: torch.Tensor | None = None  # every rank's reference rows, for the checkpoint
        self._restored: torch.Tensor | None = None  # reference rows from a checkpoint (any world size)
        self._current: Reservoir | None = None
        self._tap: FeatureTap | None = None
        self._recorder: ForwardRecorder | None = None  # what each step passes to the model (module features)
        self._codec: CallCodec | None = None  # how those inputs are kept, one row of bytes per sample
        self._batch_paths: list[int] | None = None  # where they sit in a batch (for the train loader fallback)
        self._dim: int | None = None
        self._window_seen = 0
        self._monitor: StreamMonitor | None = None
        self._monitor_fit: torch.Tensor | None = None  # the reference rows that define the monitor's score
        #: Per monitored stage of the last call: samples monitored and the alarm (``None`` while quiet).
        self.monitored: dict[str, dict[str, Any]] = {}
        self.n_tests = 0
        self.results: list[dict[str, Any]] = []
        self._results_at_setup = 0
        self._last_validation: dict[str, Any] | None = None
        self._params_snapshot: torch.Tensor | None = None
        #: The rates of each in-fit validation after the first: step, oversight_steps, update_rate, and with a
        #: shift distance at both ends, shift_rate and shift_to_update_ratio.
        self.rates: list[dict[str, float]] = []
        self.last_samples: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reference_cache: tuple[tuple[int, int], torch.Tensor] | None = None
        self._world_size = 1
        self._fitting = False
        self._device = torch.device("cpu")
        self._reference_epoch: int | None = None  # the training epoch whose rows the reference reservoir holds
        self._resumed_epoch: int | None = None  # that epoch, when a resumed fit goes on with the reservoir

    def _resolve_reference(self, table: PhaseTable) -> Stage:
        if self._reference_stage_arg is not None:
            return self._reference_stage_arg
        declared = table.stages_where(data="reference")
        if len(declared) != 1:
            raise ValueError(
                f"ShiftTracker needs one reference stage, but the phase table declares data='reference' for "
                f"{list(declared) or 'no stage'}; pass reference_stage=... or declare exactly one with "
                "Phases(overrides={<stage>: {'data': 'reference'}})."
            )
        return declared[0]

    @override
    def declared_stages(self, table: PhaseTable) -> tuple[Stage, ...]:
        reference = self._resolve_reference(table)
        tested = table.stages_where(data=("held_out", "live", "fixed_shift"))
        return tuple(stage for stage in tested if stage not in ("sanity_check", reference))

    @override
    def describe(self) -> str:
        return self._features_name

    @override
    def state_key_fields(self) -> dict[str, Any]:
        return {"features": self._features_name, "reference_stage": self._reference_stage_arg}

    # Lightning hooks ----------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # builds the table; declared_stages resolves the reference in it
        reference = self._resolve_reference(self.table)
        if reference != self.reference_stage:
            self.reference_stage, self._reference = reference, None
        declared = self.table[self.reference_stage].data
        if self._reference_stage_arg is not None and declared != "reference":
            self.warn_once(
                "reference not declared",
                f"reference_stage={self.reference_stage!r} is declared data={declared!r} in the phase table; it is "
                "used as the reference as asked. Declare it with Phases(overrides={"
                f"{self.reference_stage!r}: {{'data': 'reference'}}}}) to make the two agree.",
            )
        if self._tap is None and isinstance(self.features, str) and self.features != "input":
            module = pl_module if self.features == "output" else resolve_module(pl_module, self.features)
            self._tap = FeatureTap(module, softmax=self.features == "output" and self.output_softmax)
            self._recorder = ForwardRecorder(pl_module)
        self._results_at_setup = len(self.results)
        self._world_size, self._fitting = trainer.world_size, trainer.state.fn == TrainerFn.FITTING
        self._device = trainer.strategy.root_device
        self._resumed_epoch = None
        per_rank = math.ceil(self.reference_size / trainer.world_size)
        if self._reference is None or self._reference.capacity != per_rank:
            self._reference = Reservoir(per_rank, seed=self.seed + 7919 * trainer.global_rank)
        self._current = Reservoir(
            math.ceil(self.current_size / trainer.world_size), seed=self.seed + 1 + trainer.global_rank
        )

    @override
    def on_call_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException | None) -> None:
        done = self.results[self._results_at_setup :]
        if done:  # one W&B table per Trainer call, of that call's tests
            columns = ["stage", "step", "test", "statistic", "p_value", "n_reference", "n_current", "drift"]
            rows = [[r[c] for c in columns] for r in done]
            self.reporter.log_table(self.name, "tests", columns, rows, trainer.global_step)
        if self._tap is not None:
            self._tap.close()
            self._tap = None
        if self._recorder is not None:
            self._recorder.close()
            self._recorder = None

    @override
    def on_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        resumed, self._resumed_epoch = self._resumed_epoch, None
        if resumed == trainer.current_epoch:
            return  # a fit resumed within this epoch: the restored reservoir goes on with its rows
        if self.reference_stage == "train" and self._reference is not None:
            self._reference.reset()  # the reference is the data of the last training epoch
            self._reference_epoch = trainer.current_epoch

    @override
    def on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if self.reference_stage == "train":
            self._keep_reference(trainer)

    @override
    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if stage == self.reference_stage and stage != "train" and self._reference is not None:
            self._reference.reset()
        if stage in self.stages and self._current is not None:
            self._current.reset()
            self._window_seen = 0
        self._monitor = self._monitor_fit = None
        if stage in self.stages and self._monitors(stage):
            before = self.monitored.get(stage) or {}
            earlier = before.get("earlier_alarms", 0) + (before.get("alarm") is not None)
            self.monitored[stage] = {"samples": 0, "alarm": None, "alpha": self.alpha / 2, "earlier_alarms": earlier}

    @override
    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if stage == self.reference_stage and stage != "train":
            self._keep_reference(trainer)
        if stage in self.stages and self._current is not None:
            self._test(trainer, pl_module, stage, window=False)

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
        rows = self._collect(stage, outputs, batch)
        if rows is not None and stage in self.stages and self._monitors(stage):
            self._monitor_rows(trainer, pl_module, stage, rows)
        if stage == "predict" and self.window_size and stage in self.stages and self._window_seen >= self.window_size:
            self._test(trainer, pl_module, stage, window=True)
            self._current.reset()  # type: ignore[union-attr]
            self._window_seen = 0

    def _stored_dtype(self) -> torch.dtype:
        """What the reference holds: model inputs as bytes (module features) or feature rows."""
        return torch.uint8 if self._tap is not None else torch.float32

    def _keep_reference(self, trainer: pl.Trainer) -> None:
        """Gather every rank's reference rows (every rank is here), so a checkpoint holds the whole reference."""
        if (self._reference is not None and self._reference.sample is not None) or trainer.world_size > 1:
            local = self._reference.sample if self._reference is not None else None
            self._reference_all = _gather_rows(trainer, local, self._stored_dtype())
            self._restored = None

    @override
    def state_dict(self) -> dict[str, Any]:
        rows = self._reference_all if self._reference_all is not None else self._restored
        return {
            "reference_rows": self._checkpoint_rows(rows),
            "codec": None if self._codec is None else self._codec.state_dict(),
            "n_tests": self.n_tests,
            "results": self.results,
            "dim": self._dim,
            "reservoirs": self._reservoir_state(),
            "rates": [dict(rate) for rate in self.rates],
            "last_validation": self._last_validation,
            "params_snapshot": self._snapshot_for_checkpoint(),
        }

    def _snapshot_for_checkpoint(self) -> torch.Tensor | None:
        """The parameters at the last validation, within ``checkpoint_mb``: a resumed fit measures the interval
        that was running at the checkpoint, as the uninterrupted fit does (beyond the bound, it skips that one)."""
        snapshot = self._params_snapshot
        if snapshot is None or snapshot.numel() * snapshot.element_size() > self.checkpoint_mb * 2**20:
            return None
        return snapshot.detach().cpu()

    def _reservoir_state(self) -> dict[str, Any] | None:
        """Both reservoirs' draws (and the reference's rows, within ``checkpoint_mb``), for a one-process fit.

        A fit resumed from it samples exactly as the uninterrupted one would: a checkpoint saved within an epoch
        goes on with that epoch's reference rows, and both reservoirs continue their random draws. Only with
        one process: a checkpoint holds rank 0's state alone, and each rank samples its own rows.
        """
        if self._world_size != 1 or self._reference is None or self._current is None:
            return None
        reference = self._reference.state_dict()
        rows = reference["rows"]
        # too large: a resumed fit draws this epoch's reference from the batches after the resume
        too_large = rows is not None and rows.numel() * rows.element_size() > self.checkpoint_mb * 2**20
        current = {**self._current.state_dict(), "rows": None, "seen": 0, "weight": 1.0, "next": -1}  # draws only
        return {
            "capacities": [self._reference.capacity, self._current.capacity],
            "epoch": self._reference_epoch,
            "reference": None if too_large else reference,
            "current": current,
        }

    def _checkpoint_rows(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The reference rows for a checkpoint: all of them, or a uniform subsample within ``checkpoint_mb``."""
        if rows is None or rows.shape[0] < 2:
            return None
        row_bytes = rows[0].numel() * rows.element_size()
        keep = min(rows.shape[0], int(self.checkpoint_mb * 2**20) // max(row_bytes, 1))
        if keep < 2:
            return None
        if keep < rows.shape[0]:
            chosen = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(self.seed))[:keep]
            rows = rows[chosen.sort().values.to(rows.device)]
        return rows.detach().cpu()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_tests = int(state_dict.get("n_tests", 0))
        self.results = list(state_dict.get("results", []))
        self.rates = [dict(rate) for rate in state_dict.get("rates", [])]
        self._last_validation = state_dict.get("last_validation")
        self._params_snapshot = state_dict.get("params_snapshot")
        self._dim = state_dict.get("dim")
        codec = state_dict.get("codec")
        if codec is not None:
            self._codec = CallCodec.from_state_dict(codec)
        rows = state_dict.get("reference_rows")
        self._restored = rows if isinstance(rows, torch.Tensor) and rows.shape[0] >= 2 else None
        self._reference_cache = None  # features of the reference before, or of other weights at the same step
        if self._restored is not None:
            self._reference_all = None  # the loaded reference is the one tested against, and saved next
            if self._reference is not None:
                self._reference.reset()  # the checkpoint's reference replaces whatever this call collected so far
        reservoirs = state_dict.get("reservoirs")
        if reservoirs is not None and self._in_call and self._fitting and self._world_size == 1:  # fit(ckpt_path=)
            self._resume_reservoirs(reservoirs)

    def _resume_reservoirs(self, state: dict[str, Any]) -> None:
        """Go on with the reservoirs of a one-process fit (:meth:`_reservoir_state`) in a resumed one-process fit."""
        assert self._reference is not None and self._current is not None
        if state.get("capacities") != [self._reference.capacity, self._current.capacity]:
            return  # other sample sizes than the checkpoint's: the reservoirs start afresh
        self._current.load_state_dict(state["current"])
        if state["reference"] is None:
            return
        self._reference.load_state_dict(state["reference"])
        if self._reference.rows is not None:
            self._reference.rows = self._reference.rows.to(self._device)
        self._reference_epoch = self._resumed_epoch = state["epoch"]

    @override
    def phase_observations(self) -> list[Observation]:
        rows = []
        for stage in self.stages:
            done = [r for r in self.results if r["stage"] == stage]
            watch = self.monitored.get(stage)
            if not done and watch is None:
                continue
            if stage == "validate" and self.rates:
                rows.append(self._rates_observation())
            drifts = [r for r in done if r["drift"]]
            alarm = watch["alarm"] if watch is not None else None
            earlier = watch.get("earlier_alarms", 0) if watch is not None else 0
            untested = not done and watch is not None and alarm is None and not watch["samples"]
            if self.table[stage].data == "fixed_shift":
                verdict = "shift measured (declared fixed_shift)" if drifts else "declared shift not found"
            elif untested:
                verdict = "not tested"
            else:
                verdict = "shift detected" if drifts or alarm or earlier else "no shift"
            details = []
            if done:
                names = "/".join(sorted({r["test"] for r in done}))
                smallest = min(r["p_value"] for r in done)
                details.append(
                    f"{len(done)} {names} test(s) vs {self.reference_stage} reference, min p={smallest:.3g}, "
                    f"{len(drifts)} below alpha; false alarms expected under no shift: "
                    f"{sum(r['alpha'] for r in done):.2f}"
                )
            if watch is not None:
                details.append(_monitor_text(watch))
                if earlier:
                    details.append(f"{earlier} earlier {stage} call(s) alarmed")
            rows.append(Observation(stage, f"data vs {self.reference_stage}", verdict, "; ".join(details)))
        return rows

    def _rates_observation(self) -> Observation:
        """How fast the data moved, per oversight interval and per update, in words one can act on."""
        last = self.rates[-1]
        steps = last["oversight_steps"]
        update = statistics.mean(r["update_rate"] for r in self.rates)
        shifts = [r["shift_rate"] for r in self.rates if "shift_rate" in r]
        parts = [f"validated every {steps:.0f} steps (the oversight interval)"]
        parts.append(f"parameters moved {update:.3g} of their norm per step ({update * steps:.3g} per interval)")
        if shifts:
            shift = statistics.mean(shifts)
            ratio = shift / update if update > 0 else math.inf
            moved = f"{shift * 1000:.3g} (MMD distance) per 1k steps, {shift * steps:.3g} per interval"
            parts.insert(0, f"validation data moved {moved}")
            parts.append(
                f"shift/update ratio {ratio:.3g} (data distance per relative parameter change; a ratio that rises "
                "from run to run means the data moves faster than training follows it: validate more often or "
                "retrain on fresh data)"
            )
        verdict = f"{len(self.rates)} intervals measured"
        return Observation("validate", "shift rate vs update rate", verdict, "; ".join(parts))

    # Collecting ---------------------------------------------------------------------------------------------

    def _collect(self, stage: Stage, outputs: Any, batch: Any) -> torch.Tensor | None:
        tapped = self._tap.take() if self._tap is not None else None
        call = self._recorder.take() if self._recorder is not None else None
        if stage == self.reference_stage and self._reference is not None:
            # Module features are computed again from the stored model inputs at test time (never stale).
            if self._tap is None:
                self._reference.add(self._rows(batch, outputs, tapped))
            else:
                rows = self._model_inputs(call)
                if rows is not None:
                    self._reference.add(rows)
        elif stage in self.stages and self._current is not None:
            if call is not None and self._batch_paths is None:
                self._learn_batch_paths(batch, call)
            rows = self._rows(batch, outputs, tapped)
            self._check_dim(rows)
            self._current.add(rows)
            self._window_seen += rows.shape[0]
            return rows
        return None

    def _model_inputs(self, call: Call | None) -> torch.Tensor | None:
        """The inputs the step passed to the model, one row of bytes per sample (``None``: left out)."""
        if call is None:
            raise ValueError(
                f"ShiftTracker(features={self.features!r}): the training step did not call the model (self(...)), "
                "so its inputs cannot be kept to compute the features again at test time; call the model in the "
                "step, or pass a callable features=(batch, outputs) -> Tensor."
            )
        if self._codec is None:
            self._codec = CallCodec.of(call)
        if not self._codec.fits(call):
            self.warn_once(
                "inputs changed shape",
                f"features={self.features!r}: a batch's model inputs differ in structure or per-sample shape from "
                "the first batch's (e.g. sequences padded to each batch's longest); such batches are left out of "
                "the reference. Pad to one length to keep every batch.",
            )
            return None
        return self._codec.encode(call)

    def _learn_batch_paths(self, batch: Any, call: Call) -> None:
        """Where the model's inputs sit in a batch, so a reference can be drawn from the train loader."""
        if self._codec is None:
            self._codec = CallCodec.of(call)
        if self._codec.fits(call):
            self._batch_paths = self._codec.batch_paths(batch, call)

    def _rows(self, batch: Any, outputs: Any, tapped: torch.Tensor | None) -> torch.Tensor:
        if callable(self.features):
            return as_rows(self.features(batch, outputs))
        if self.features == "input":
            return as_rows(batch_input(batch))
        if tapped is None:
            raise RuntimeError(
                f"ShiftTracker(features={self.features!r}): the module did not run in this batch's step; "
                "call it in the step (e.g. self(x)) or pass a callable features=(batch, outputs) -> Tensor."
            )
        return tapped

    def _check_dim(self, rows: torch.Tensor) -> None:
        if self._dim is None:
            self._dim = rows.shape[1]
        elif rows.shape[1] != self._dim:
            raise ValueError(
                f"ShiftTracker(features={self.features!r}): features changed dimension from {self._dim} to "
                f"{rows.shape[1]} between batches; every batch must give the same number of features per sample."
            )

    def _reference_rows(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor | None:
        """Every rank's reference rows (features recomputed with today's weights), gathered in rank order.

        The reference is what this call collected; else the checkpoint's (each rank takes every
        ``world_size``-th row, so any world size restores the same set); else, for a ``train`` reference, a
        sample of the datamodule's ``train_dataloader()`` (test or predict without a fit).
        """
        assert self._reference is not None
        local, version = self._reference.sample, self._reference.version
        if local is None and self._restored is not None:
            local, version = self._restored[trainer.global_rank :: trainer.world_size], -1
        elif local is None and trainer.datamodule is not None and self.reference_stage == "train":
            self._reference_from_loader(trainer, trainer.datamodule.train_dataloader())
            local, version = self._reference.sample, self._reference.version
        if local is not None:
            local = local.to(trainer.strategy.root_device)
        if local is not None and self._tap is not None:
            # The same reference rows and weights give the same features: predict windows reuse them. Only
            # this rank's work is cached; the gather below runs at every test on every rank alike.
            key = (version, trainer.global_step)
            if self._reference_cache is None or self._reference_cache[0] != key:
                self._reference_cache = (key, self._recompute(pl_module, local))
            local = self._reference_cache[1]
        return _gather_rows(trainer, local, torch.float32)

    def _reference_from_loader(self, trainer: pl.Trainer, loader: Any) -> None:
        """Each rank samples its share of the loader's batches (every ``world_size``-th), so ranks differ."""
        assert self._reference is not None
        if self._tap is not None and (self._codec is None or self._batch_paths is None):
            self.warn_once(
                "no reference",
                f"features={self.features!r}: no reference (no fit in this process, no checkpoint), and the model's "
                "inputs are not tensors of the batch as they are, so they cannot be drawn from train_dataloader(); "
                "test with ckpt_path=... of a fit with this ShiftTracker. Nothing is tested.",
            )
            return
        for index, batch in enumerate(loader):
            if index % trainer.world_size != trainer.global_rank:
                continue
            if self._tap is None:
                self._reference.add(self._rows(batch, None, None))
            else:
                assert self._codec is not None and self._batch_paths is not None
                call = self._codec.call_from_batch(batch, self._batch_paths)
                if self._codec.fits(call):
                    self._reference.add(self._codec.encode(call))
            if self._reference.seen >= 4 * self._reference.capacity:
                break

    @torch.no_grad()
    def _recompute(self, pl_module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The tapped module's features of the stored reference inputs, with today's weights, in eval mode."""
        assert self._tap is not None and self._codec is not None and self._recorder is not None
        self._tap.take()
        was_training = pl_module.training
        pl_module.eval()
        try:
            chunks = []
            for start in range(0, inputs.shape[0], RECOMPUTE_CHUNK):
                args, kwargs = self._codec.decode(inputs[start : start + RECOMPUTE_CHUNK], pl_module.device)
                pl_module(*args, **kwargs)
                self._recorder.take()  # our own call is not a step's
                chunks.append(self._tap.take())
        finally:
            pl_module.train(was_training)
        return torch.cat([c for c in chunks if c is not None])

    # Testing ------------------------------------------------------------------------------------------------

    def _test(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, window: bool) -> None:
        assert self._current is not None
        reference = self._reference_rows(trainer, pl_module)
        current = _gather_rows(trainer, self._current.sample, torch.float32)
        if reference is None or current is None or reference.shape[0] < 2 or current.shape[0] < 2:
            return
        current = current.to(reference.device)
        finite = self._finite_rows(trainer, stage, reference, current, window)
        if finite is None:  # too few finite rows: no test, so no p-value computed from NaN
            if stage == "validate" and trainer.state.fn == TrainerFn.FITTING and self.track_rates:
                self._log_rates(trainer, pl_module, None)
            return
        reference, current = finite
        if self.reduce is not None:
            # fitted on the pooled sample, a function of the two samples as one set: the permutation null
            # stays exact (fitted on the reference alone, PCA made it look tighter than fresh data of the
            # same law, and same-law samples were "shifted" in 40 of 40 tests at d >= 128)
            pooled = torch.cat([reference, current])
            project = fit_reduction(pooled, self.reduce, self.reduce_dim, seed=self.seed)
            reference, current = project(reference), project(current)
        self.last_samples = (reference, current)
        alpha = self.alpha / 2 if self._monitors(stage) else self.alpha
        alpha_each = alpha / len(self.tests)
        distance = None
        if {"mmd", "mmdagg"} & set(self.tests) and trainer.is_global_zero:
            pooled = reference.shape[0] + current.shape[0]
            level = logging.INFO if pooled >= LARGE_TEST else logging.DEBUG
            logger.log(
                level,
                f"{self.name}: MMD test of {stage} data, n={reference.shape[0]} vs m={current.shape[0]}, "
                f"{self.n_permutations} permutations (kernel matrix {pooled * pooled * 4 / 2**20:.0f} MiB)",
            )
        detected = []
        for name in self.tests:
            self.n_tests += 1
            if name in ("mmd", "mmdagg"):
                test = mmd_test if name == "mmd" else mmdagg_test
                result = test(reference, current, self.n_permutations, seed=self.seed + self.n_tests)
                distance = math.sqrt(max(result.statistic, 0.0))
            else:
                result = ks_test(reference, current)
            event = self._report(trainer, stage, result, alpha_each, window)
            if event is not None:
                detected.append(event)
        if stage == "validate" and trainer.state.fn == TrainerFn.FITTING and self.track_rates:
            self._log_rates(trainer, pl_module, distance)
        if detected:  # every test of this stage has run and is reported before any stop or raise
            self.act(trainer, detected[0])

    def _monitors(self, stage: Stage) -> bool:
        """Whether ``stage`` is watched by the anytime-valid stream monitor."""
        return self.anytime_valid and self.table[stage].data == "live"

    def _monitor_rows(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, rows: torch.Tensor
    ) -> None:
        """Bet on one batch's samples (every rank's, so every rank decides alike); alarm once per stage."""
        watch = self.monitored[stage]
        if watch["alarm"] is not None:
            return
        rows = _gather_rows(trainer, rows.float(), torch.float32)
        if rows is None:
            return
        rows = rows[torch.isfinite(rows).all(dim=1)]  # non-finite rows are counted by the end-of-stage test
        if self._monitor is None and not self._start_monitor(trainer, pl_module, watch):
            return
        assert self._monitor is not None and self._monitor_fit is not None
        if rows.shape[0] == 0:
            return
        fired = bool(self._monitor.update(knn_scores(self._monitor_fit, rows.to(self._monitor_fit.device)).cpu())[0])
        watch["samples"] = self._monitor.seen
        if fired:
            alarm = self._monitor.alarm()
            assert alarm is not None
            self._sequential_alarm(trainer, stage, alarm, watch)

    def _start_monitor(self, trainer: pl.Trainer, pl_module: pl.LightningModule, watch: dict[str, Any]) -> bool:
        """Split the reference into score-fitting and calibration halves and start the monitor."""
        reference = self._reference_rows(trainer, pl_module)
        if reference is not None:
            reference = reference.float()
            reference = reference[torch.isfinite(reference).all(dim=1)]
        if reference is None or reference.shape[0] < 4:
            found = 0 if reference is None else reference.shape[0]
            watch["untested"] = (
                f"no reference to test against ({found} finite {self.reference_stage} rows; the monitor needs 4 or "
                f"more: fit first, keep the reference in the checkpoint, or pass a datamodule)"
            )
            self.warn_once("no reference", f"the anytime-valid monitor tests nothing: {watch['untested']}")
            return False
        order = torch.randperm(reference.shape[0], generator=torch.Generator().manual_seed(self.seed))
        reference = canonical_order(reference)[order.to(reference.device)]
        half = reference.shape[0] // 2
        self._monitor_fit = reference[:half]
        calibration = knn_scores(self._monitor_fit, reference[half:]).cpu()
        self._monitor = StreamMonitor(calibration, watch["alpha"], seed=self.seed)
        watch["reference_rows"] = [half, reference.shape[0] - half]
        return True

    def _sequential_alarm(self, trainer: pl.Trainer, stage: Stage, alarm: Alarm, watch: dict[str, Any]) -> None:
        data = {
            "test": "sequential",
            "sequential": True,
            "alarm_sample": alarm.sample,
            "estimated_start_sample": alarm.estimated_start,
            "delay_samples": alarm.delay,
            "wealth": alarm.wealth,
            "alpha": watch["alpha"],
            "features": self._features_name,
            "fit_rows": watch["reference_rows"][0],
            "calibration_rows": watch["reference_rows"][1],
        }
        watch["alarm"] = data
        event = self.emit(
            trainer,
            "shift_detected",
            f"{stage} stream differs from the {self.reference_stage} reference: the anytime-valid monitor's "
            f"wealth reached {alarm.wealth:.3g} >= 1/alpha = {1 / watch['alpha']:.3g} at sample {alarm.sample}; "
            f"the shift is estimated to have begun after sample {alarm.estimated_start}, so it was detected "
            f"{alarm.delay} samples later (the chance of any false alarm on this stream, however long, is at "
            f"most {watch['alpha']:.3g})",
            data,
            stage=stage,
        )
        self.act(trainer, event)

    def _finite_rows(
        self, trainer: pl.Trainer, stage: Stage, reference: torch.Tensor, current: torch.Tensor, window: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Both samples without their rows that hold NaN or inf, or ``None`` when fewer than 2 remain on a side.

        Dropped rows are one ``non_finite_features`` warning event that says how many of which sample.
        """
        keep_reference = torch.isfinite(reference).all(dim=1)
        keep_current = torch.isfinite(current).all(dim=1)
        dropped = torch.stack([(~keep_reference).sum(), (~keep_current).sum()]).tolist()  # one host sync
        if not any(dropped):
            return reference, current
        sizes = [reference.shape[0], current.shape[0]]
        reference, current = reference[keep_reference], current[keep_current]
        kept = [reference.shape[0], current.shape[0]]
        refused = min(kept) < 2
        where = f"{stage} window" if window else stage
        counts = " and ".join(
            f"{n} of {total} {side} rows"
            for n, total, side in zip(dropped, sizes, ("reference", "current"), strict=True)
            if n
        )
        outcome = (
            f"fewer than 2 finite rows remain ({kept[0]} reference, {kept[1]} current), so no test was run and "
            "there is no p-value"
            if refused
            else f"the tests use the {kept[0]} reference and {kept[1]} current rows that remain"
        )
        self.emit(
            trainer,
            "non_finite_features",
            f"{counts} of the {where} test hold NaN or inf features and were dropped; {outcome}",
            {
                "reference_dropped": dropped[0],
                "reference_rows": sizes[0],
                "current_dropped": dropped[1],
                "current_rows": sizes[1],
                "refused": refused,
                "features": self._features_name,
                "window": window,
            },
            severity="warning",
            stage=stage,
        )
        return None if refused else (reference, current)

    @override
    def act(self, trainer: pl.Trainer, event: PhaseEvent) -> None:
        if self.on_violation == "stop" and trainer.state.fn == TrainerFn.FITTING:
            trainer.should_stop = True
        super().act(trainer, event)

    def _report(
        self, trainer: pl.Trainer, stage: Stage, result: TestResult, alpha_each: float, window: bool
    ) -> PhaseEvent | None:
        """Emit the test's ``shift_test`` event, and ``shift_detected`` when it found an unexpected shift."""
        expected = self.table[stage].data == "fixed_shift"
        drift = result.p_value < alpha_each
        data = {
            "test": result.test,
            "statistic": result.statistic,
            "p_value": result.p_value,
            "n_reference": result.n_reference,
            "n_current": result.n_current,
            "drift": drift,
            "alpha": alpha_each,
            "features": self._features_name,
            "window": window,
            "tests_so_far": self.n_tests,
            "expected_shift": expected,
        }
        if result.bandwidth is not None:
            data.update(bandwidth=result.bandwidth, n_permutations=result.n_permutations)
        if result.kernels is not None and result.kernel_p_values is not None:
            data["kernels"] = [
                {"space": space, "kernel": family, "bandwidth": bandwidth, "p_value": p}
                for (space, family, bandwidth), p in zip(result.kernels, result.kernel_p_values, strict=True)
            ]
        self.results.append({"stage": stage, "step": trainer.global_step, **data})
        where = f"{stage} window" if window else stage
        declared = ""
        if expected:
            found = "measured" if drift else "not found at this alpha"
            declared = f"; {stage} is declared fixed_shift, so the shift is expected ({found}), not an alarm"
        self.emit(
            trainer,
            "shift_test",
            f"{result.test.upper()} test of {where} data against the {self.reference_stage} reference: "
            f"statistic {result.statistic:.4g}, p={result.p_value:.4g} (n={result.n_reference}, m={result.n_current})"
            + declared,
            data,
            severity="info",
            stage=stage,
        )
        self.log_metrics(
            trainer,
            {f"{stage}_{result.test}_p_value": result.p_value, f"{stage}_{result.test}_statistic": result.statistic},
        )
        if not drift or expected:
            return None
        return self.emit(
            trainer,
            "shift_detected",
            f"{where} data differ from the {self.reference_stage} reference: {result.test.upper()} "
            f"p={result.p_value:.4g} < alpha={alpha_each:.4g}",
            data,
            stage=stage,
        )

    def _log_rates(self, trainer: pl.Trainer, pl_module: pl.LightningModule, distance: float | None) -> None:
        params = torch.cat([p.detach().flatten().float() for p in pl_module.parameters() if p.requires_grad])
        step = trainer.global_step
        metrics: dict[str, float] = {}
        if distance is not None:
            metrics["shift_distance"] = distance
        previous = self._last_validation
        if self._params_snapshot is not None and self._params_snapshot.device != params.device:
            self._params_snapshot = self._params_snapshot.to(params.device)  # restored from a checkpoint
        if previous is not None and self._params_snapshot is not None and step > previous["step"]:
            steps = step - previous["step"]
            metrics["oversight_steps"] = float(steps)
            norm = self._params_snapshot.norm().item()
            update_rate = (params - self._params_snapshot).norm().item() / max(norm, 1e-12) / steps
            metrics["update_rate"] = update_rate
            if distance is not None and previous.get("distance") is not None:
                shift_rate = abs(distance - previous["distance"]) / steps
                metrics["shift_rate"] = shift_rate
                if update_rate > 0:
                    metrics["shift_to_update_ratio"] = shift_rate / update_rate
        self._params_snapshot = params  # torch.cat made a copy
        self._last_validation = {"step": step, "distance": distance}
        if "oversight_steps" in metrics:
            self.rates.append({"step": float(step), **metrics})
        if metrics:
            self.log_metrics(trainer, metrics)


def _monitor_text(watch: dict[str, Any]) -> str:
    """The anytime-valid monitor's outcome on one stage, in words."""
    alarm = watch["alarm"]
    if alarm is None and not watch["samples"]:
        return "anytime-valid monitor: tested no sample, " + watch.get(
            "untested", "no finite feature row reached it (see the non_finite_features event)"
        )
    if alarm is None:
        return (
            f"anytime-valid monitor: no alarm over {watch['samples']} samples (chance of any false alarm on this "
            f"stream, however long: at most {watch['alpha']:.3g})"
        )
    return (
        f"anytime-valid monitor: alarm at sample {alarm['alarm_sample']}, about {alarm['delay_samples']} samples "
        f"after the shift began (estimated at sample {alarm['estimated_start_sample']})"
    )


def _gather_rows(trainer: pl.Trainer, rows: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Every rank's rows, concatenated in rank order (ranks may hold different numbers, or none).

    ``dtype`` is what a rank without rows sends, so that every rank's tensors agree.
    """
    if trainer.world_size == 1:
        return rows
    device = trainer.strategy.root_device
    width = torch.tensor([-1 if rows is None else rows.shape[1]], device=device)
    widths = trainer.strategy.all_gather(width).flatten()
    d = int(widths.max().item())
    if d < 0:
        return None
    local = rows.to(device) if rows is not None else torch.zeros((0, d), device=device, dtype=dtype)
    counts = trainer.strategy.all_gather(torch.tensor([local.shape[0]], device=device)).flatten().tolist()
    padded = torch.zeros((max(counts), d), device=device, dtype=local.dtype)
    padded[: local.shape[0]] = local
    gathered = trainer.strategy.all_gather(padded).reshape(len(counts), max(counts), d)
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])
