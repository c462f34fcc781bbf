"""``ShiftTracker``: how far, and how fast, the data moves away from the training reference."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from lightning_phases.callbacks.base import PhaseCallback
from lightning_phases.detectors.features import FeatureTap, as_rows, batch_input, resolve_module
from lightning_phases.detectors.reservoir import Reservoir
from lightning_phases.detectors.two_sample import TestResult, fit_reduction, ks_test, mmd_test
from lightning_phases.phases import PhaseOverrides, Stage, check_stages, current_stage
from lightning_phases.reporting.report_model import Observation
from lightning_phases.validation import check_choice, check_choices, check_positive

TestName = Literal["mmd", "ks"]
Reduction = Literal["pca", "random"]
FeatureFn = Callable[[Any, Any], torch.Tensor]

#: Rows per forward pass when the reference's features are recomputed with the current weights.
RECOMPUTE_CHUNK = 512


class ShiftTracker(PhaseCallback):
    """Calibrated two-sample tests of each stage's data against the training reference, and shift rates.

    During ``reference_stage`` (the training data of the last training epoch, by default) a uniform
    reservoir sample of ``reference_size`` samples is kept. When a stage in ``stages`` ends, its samples
    (a reservoir of ``current_size``) are tested against the reference: a kernel MMD test with a Gaussian
    kernel (median-heuristic bandwidth) and a permutation p-value, all permutations in one batched product,
    and for softmax outputs also per-dimension KS tests with Bonferroni. Long predict runs are also tested
    in sliding windows of ``window_size`` samples. Each test is a ``shift_test`` info event; a p-value below
    ``alpha`` (divided by the number of tests run together) is a ``shift_detected`` event.

    Features from a module (a submodule name or ``"output"``) are computed again on the reference *inputs*
    with the current weights at every test, so a reference taken while that module trained is never stale,
    and both sides are computed in the same (eval) mode. Under DDP each rank keeps
    ``reference_size / world_size`` reference samples and the samples are gathered before testing; tests
    see the rows in a canonical order, so the p-value on N processes equals the single-process one on the
    same samples and seed.

    In-fit validation also logs the shift distance (sqrt of MMD²) over time, its rate per optimizer step,
    the parameter update rate (relative norm of the change of the trainable parameters per step), the
    oversight interval (steps between validations) and the ratio of shift rate to update rate.

    Each test at ``alpha`` has probability ``alpha`` of a false alarm when nothing shifted, so repeated tests
    (one per validation) are counted: every ``shift_test`` event holds ``tests_so_far`` and the phase report
    gives the number of tests and the false alarms expected from them (``alpha`` x tests).

    Args:
        features: What is compared: ``"input"`` (the batch's input tensor, flattened), a submodule's name
            (its output, e.g. a backbone's last layer), ``"output"`` (the model's output; softmax over the last
            dimension for 2-d outputs when ``output_softmax``), or a callable ``(batch, outputs) -> Tensor``.
        reference_stage: The stage whose data is the reference (its last epoch's data, for ``train``).
        reference_size: Reference samples kept (at least 2).
        stages: Stages whose data is tested against the reference.
        alpha: Significance level of a run of tests.
        tests: ``"mmd"`` and/or ``"ks"``; by default ``["mmd"]``, plus ``"ks"`` when ``features="output"``.
        n_permutations: Permutations of the MMD test; the smallest p-value is ``1 / (1 + n_permutations)``.
        current_size: Samples of a tested stage kept (a reservoir); by default ``reference_size``.
        window_size: In ``predict``, also test every ``window_size`` samples; ``None``: only at the end.
        reduce: Reduce features to ``reduce_dim`` dimensions before testing: ``"pca"`` (fitted on the
            reference) or ``"random"`` (a fixed projection); ``None`` keeps them.
        reduce_dim: Target dimension of ``reduce``.
        output_softmax: Softmax of 2-d outputs for ``features="output"``.
        track_rates: Log the shift, update and oversight rates in fit (keeps a copy of the trainable
            parameters, taken at each validation).
        seed: Seed of the reservoirs, the permutations and the random projection.
        phase_overrides: Changes to the declared-property table; see :class:`PhaseCallback`.

    After each test, ``last_samples`` holds the ``(reference, current)`` rows it compared (gathered over
    ranks, reduced if ``reduce`` is set), and ``results`` every test's outcome.
    """

    def __init__(
        self,
        features: str | FeatureFn = "input",
        reference_stage: Stage = "train",
        reference_size: int = 1000,
        stages: Sequence[Stage] = ("validate", "test", "predict"),
        alpha: float = 0.05,
        tests: Sequence[TestName] | None = None,
        n_permutations: int = 1000,
        current_size: int | None = None,
        window_size: int | None = None,
        reduce: Reduction | None = None,
        reduce_dim: int = 32,
        output_softmax: bool = True,
        track_rates: bool = True,
        seed: int = 0,
        phase_overrides: PhaseOverrides | None = None,
    ) -> None:
        super().__init__(stages, phase_overrides)
        if not (callable(features) or (isinstance(features, str) and features)):
            raise TypeError(f"features={features!r} must be 'input', 'output', a module name or a callable.")
        self.features = features
        self.reference_stage: Stage = check_stages("reference_stage", [reference_stage])[0]
        if self.reference_stage in self.stages:
            raise ValueError(f"reference_stage={reference_stage!r} cannot also be one of stages={list(self.stages)}.")
        if isinstance(reference_size, bool) or not isinstance(reference_size, int) or reference_size < 2:
            raise ValueError(f"reference_size={reference_size!r} must be an integer of at least 2.")
        self.reference_size = reference_size
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
            raise ValueError(f"alpha={alpha!r} must be a number strictly between 0 and 1.")
        self.alpha = float(alpha)
        default_tests: tuple[str, ...] = ("mmd", "ks") if features == "output" else ("mmd",)
        self.tests = check_choices("tests", tests if tests is not None else default_tests, ("mmd", "ks"))
        self.n_permutations = check_positive("n_permutations", n_permutations, integer=True)
        self.current_size = check_positive("current_size", current_size or reference_size, integer=True)
        self.window_size = None if window_size is None else check_positive("window_size", window_size, integer=True)
        self.reduce = None if reduce is None else check_choice("reduce", reduce, ("pca", "random"))
        self.reduce_dim = check_positive("reduce_dim", reduce_dim, integer=True)
        self.output_softmax = output_softmax
        self.track_rates = track_rates
        self.seed = seed

        self._reference: Reservoir | None = None
        self._current: Reservoir | None = None
        self._tap: FeatureTap | None = None
        self._dim: int | None = None
        self._window_seen = 0
        self.n_tests = 0
        self.results: list[dict[str, Any]] = []
        self._last_validation: dict[str, Any] | None = None
        self._params_snapshot: torch.Tensor | None = None
        self.last_samples: tuple[torch.Tensor, torch.Tensor] | None = None
        self._features_name = features if isinstance(features, str) else getattr(features, "__qualname__", "fn")
        self._reference_cache: tuple[tuple[int, int], torch.Tensor] | None = None
        # Lightning asks for the key several times per step; it depends only on arguments fixed here.
        self._state_key = self._generate_state_key(
            features=self._features_name, reference_stage=self.reference_stage, stages=self.stages
        )

    @property
    def state_key(self) -> str:
        return self._state_key

    # Lightning hooks ----------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._tap is None and isinstance(self.features, str) and self.features != "input":
            module = pl_module if self.features == "output" else resolve_module(pl_module, self.features)
            self._tap = FeatureTap(module, softmax=self.features == "output" and self.output_softmax)
        per_rank = math.ceil(self.reference_size / trainer.world_size)
        if self._reference is None:
            self._reference = Reservoir(per_rank, seed=self.seed + 7919 * trainer.global_rank)
        self._current = Reservoir(
            math.ceil(self.current_size / trainer.world_size), seed=self.seed + 1 + trainer.global_rank
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close_tap()
        super().teardown(trainer, pl_module, stage)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_tap()
        super().on_exception(trainer, pl_module, exception)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reference_stage == "train" and self._reference is not None:
            self._reference.reset()  # the reference is the data of the last training epoch

    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if stage == self.reference_stage and stage != "train" and self._reference is not None:
            self._reference.reset()
        if stage in self.stages and self._current is not None:
            self._current.reset()
            self._window_seen = 0

    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if stage in self.stages and self._current is not None:
            self._test(trainer, pl_module, stage, window=False)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._collect(trainer, outputs, batch)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect(trainer, outputs, batch)

    on_test_batch_end = on_validation_batch_end

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        if self.window_size and current_stage(trainer) in self.stages and self._window_seen >= self.window_size:
            self._test(trainer, pl_module, "predict", window=True)
            self._current.reset()  # type: ignore[union-attr]
            self._window_seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "reference": None if self._reference is None else self._reference.state_dict(),
            "n_tests": self.n_tests,
            "results": self.results,
            "dim": self._dim,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_tests = int(state_dict.get("n_tests", 0))
        self.results = list(state_dict.get("results", []))
        self._dim = state_dict.get("dim")
        saved = state_dict.get("reference")
        if saved is not None:
            if self._reference is None:
                self._reference = Reservoir(self.reference_size, seed=self.seed)
            self._reference.load_state_dict(saved)

    def phase_observations(self) -> list[Observation]:
        rows = []
        for stage in self.stages:
            done = [r for r in self.results if r["stage"] == stage]
            if not done:
                continue
            drifts = [r for r in done if r["drift"]]
            verdict = "shift detected" if drifts else "no shift"
            names = "/".join(sorted({r["test"] for r in done}))
            smallest = min(r["p_value"] for r in done)
            detail = (
                f"{len(done)} {names} test(s) vs {self.reference_stage} reference, min p={smallest:.3g}, "
                f"{len(drifts)} below alpha; false alarms expected under no shift: {self.alpha * len(done):.2f}"
            )
            rows.append(Observation(stage, f"data vs {self.reference_stage}", verdict, detail))
        return rows

    # Collecting ---------------------------------------------------------------------------------------------

    def _collect(self, trainer: pl.Trainer, outputs: Any, batch: Any) -> None:
        tapped = self._tap.take() if self._tap is not None else None
        stage = current_stage(trainer)
        if stage == self.reference_stage and self._reference is not None:
            # Module features are recomputed from the reference inputs at test time (never stale).
            rows = as_rows(batch_input(batch)) if self._tap is not None else self._rows(batch, outputs, tapped)
            self._reference.add(rows)
        elif stage in self.stages and self._current is not None:
            rows = self._rows(batch, outputs, tapped)
            self._check_dim(rows)
            self._current.add(rows)
            self._window_seen += rows.shape[0]

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
        assert self._reference is not None
        if self._reference.sample is None and trainer.datamodule is not None and self.reference_stage == "train":
            self._reference_from_loader(trainer.datamodule.train_dataloader())  # test/predict without a fit
        local = self._reference.sample
        if local is not None and self._tap is not None:
            # The same reference rows and weights give the same features: predict windows reuse them. Only
            # this rank's work is cached; the gather below runs at every test on every rank alike.
            key = (self._reference.version, trainer.global_step)
            if self._reference_cache is None or self._reference_cache[0] != key:
                self._reference_cache = (key, self._recompute(pl_module, local))
            local = self._reference_cache[1]
        return _gather_rows(trainer, local)

    def _reference_from_loader(self, loader: Any) -> None:
        assert self._reference is not None
        for batch in loader:
            self._reference.add(as_rows(batch_input(batch)) if self._tap is not None else self._rows(batch, None, None))
            if self._reference.seen >= 4 * self._reference.capacity:
                break

    @torch.no_grad()
    def _recompute(self, pl_module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The tapped module's features of the stored reference inputs, with today's weights, in eval mode."""
        assert self._tap is not None
        self._tap.take()
        was_training = pl_module.training
        pl_module.eval()
        try:
            chunks = []
            for start in range(0, inputs.shape[0], RECOMPUTE_CHUNK):
                pl_module(inputs[start : start + RECOMPUTE_CHUNK].to(pl_module.device))
                chunks.append(self._tap.take())
        finally:
            pl_module.train(was_training)
        return torch.cat([c for c in chunks if c is not None])

    # Testing ------------------------------------------------------------------------------------------------

    def _test(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, window: bool) -> None:
        assert self._current is not None
        reference = self._reference_rows(trainer, pl_module)
        current = _gather_rows(trainer, self._current.sample)
        if reference is None or current is None or reference.shape[0] < 2 or current.shape[0] < 2:
            return
        current = current.to(reference.device)
        if self.reduce is not None:
            project = fit_reduction(reference, self.reduce, self.reduce_dim, seed=self.seed)
            reference, current = project(reference), project(current)
        self.last_samples = (reference, current)
        alpha_each = self.alpha / len(self.tests)
        distance = None
        for name in self.tests:
            self.n_tests += 1
            if name == "mmd":
                result = mmd_test(reference, current, self.n_permutations, seed=self.seed + self.n_tests)
                distance = math.sqrt(max(result.statistic, 0.0))
            else:
                result = ks_test(reference, current)
            self._report(trainer, stage, result, alpha_each, window)
        columns = ["stage", "step", "test", "statistic", "p_value", "n_reference", "n_current", "drift"]
        rows = [[r[c] for c in columns] for r in self.results]
        self.reporter.log_table(self.name, "tests", columns, rows, trainer.global_step)
        if stage == "validate" and trainer.state.fn == TrainerFn.FITTING and self.track_rates:
            self._log_rates(trainer, pl_module, distance)

    def _report(self, trainer: pl.Trainer, stage: Stage, result: TestResult, alpha_each: float, window: bool) -> None:
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
        }
        if result.bandwidth is not None:
            data.update(bandwidth=result.bandwidth, n_permutations=result.n_permutations)
        self.results.append({"stage": stage, "step": trainer.global_step, **data})
        where = f"{stage} window" if window else stage
        self.emit(
            trainer,
            "shift_test",
            f"{result.test.upper()} test of {where} data against the {self.reference_stage} reference: "
            f"statistic {result.statistic:.4g}, p={result.p_value:.4g} (n={result.n_reference}, m={result.n_current})",
            data,
            severity="info",
            stage=stage,
        )
        self.log_metrics(
            trainer,
            {f"{stage}_{result.test}_p_value": result.p_value, f"{stage}_{result.test}_statistic": result.statistic},
        )
        if drift:
            self.emit(
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
        if metrics:
            self.log_metrics(trainer, metrics)

    def _close_tap(self) -> None:
        if self._tap is not None:
            self._tap.close()
            self._tap = None


def _gather_rows(trainer: pl.Trainer, rows: torch.Tensor | None) -> torch.Tensor | None:
    """Every rank's rows, concatenated in rank order (ranks may hold different numbers, or none)."""
    if trainer.world_size == 1:
        return rows
    device = trainer.strategy.root_device
    width = torch.tensor([-1 if rows is None else rows.shape[1]], device=device)
    widths = trainer.strategy.all_gather(width).flatten()
    d = int(widths.max().item())
    if d < 0:
        return None
    local = rows.to(device) if rows is not None else torch.zeros((0, d), device=device)
    counts = trainer.strategy.all_gather(torch.tensor([local.shape[0]], device=device)).flatten().tolist()
    padded = torch.zeros((max(counts), d), device=device, dtype=local.dtype)
    padded[: local.shape[0]] = local
    gathered = trainer.strategy.all_gather(padded).reshape(len(counts), max(counts), d)
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])
