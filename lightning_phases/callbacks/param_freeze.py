"""``ParamFreezeAssertion``: proves parameters and buffers stay bit-for-bit fixed where declared fixed."""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, TypedDict

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BackboneFinetuning, BaseFinetuning
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from typing_extensions import Required, override

from lightning_phases.callbacks.base import PhaseCallback
from lightning_phases.detectors.fingerprint import fingerprints
from lightning_phases.detectors.freeze import (
    FreezeBaseline,
    FrozenRule,
    Snapshot,
    TensorChange,
    frozen_rules,
    match_patterns,
    named_tensors,
    tensor_names,
)
from lightning_phases.exceptions import ParameterChangedError, PhaseUsageError
from lightning_phases.phases import PhaseTable, Stage
from lightning_phases.reporting.report_model import Observation
from lightning_phases.validation import (
    NonNegativeInt,
    check_bool,
    check_choice,
    check_positive,
    check_texts,
    suggestion,
)


@dataclass
class _Tally:
    checks: int = 0
    changes: int = 0
    unverifiable: int = 0
    buffer_syncs: int = 0


class FrozenSpec(TypedDict, total=False):
    """A ``frozen`` entry with a declared end, e.g. ``{"pattern": "backbone.*", "until_epoch": 5}``.

    Attributes:
        pattern: ``fnmatch`` pattern or module prefix of tensor names.
        until_epoch: The tensors are frozen before this epoch and may train from its start on.
        until_step: The tensors are frozen before this global step and may train from it on.
    """

    pattern: Required[str]
    until_epoch: NonNegativeInt
    until_step: NonNegativeInt


@dataclass
class _StageRun:
    """One running stage: ``fixed`` (every tensor) or ``frozen`` (the frozen ones only).

    The baseline is taken at the stage's first batch and the last comparison made after its last batch, so
    weights swapped in by a hook before the first batch and back after the last (an EMA/weight-averaging
    swap for evaluation) are the same weights at both ends, whichever order the callbacks run in.
    """

    scope: str
    names: list[str] | None  # None: every tensor
    outer: FreezeBaseline | None = None  # from the stage's first batch
    inner: FreezeBaseline | None = None  # from the last in-stage check
    finished: bool = False  # compared after the last batch
    reported: set[str] = field(default_factory=set)


class ParamFreezeAssertion(PhaseCallback):
    """Verify that parameters and buffers do not change, bit for bit, in stages declared fixed.

    Every parameter (and buffer) is fingerprinted on its own device with a position-weighted 64-bit sum of
    its bits: no copy of the weights, one host synchronisation per check. Any changed bit in any element
    (``-0.0`` vs ``0.0``, NaN payloads, two swapped elements) is reported by tensor name. In multi-process
    runs every rank's findings are gathered, so all ranks emit the same event and raise together, and
    parameters are compared across data-parallel replicas.

    Which stages are checked comes from the declared phase table (:class:`~lightning_phases.Phases`): every
    tensor in the stages declared ``parameters: fixed`` (by default ``sanity_check``, ``validate``, ``test``,
    ``predict``), and the tensors matching ``frozen`` (less ``exclude``) in the stages declared ``updated``
    (``train``; and e.g. ``predict`` for online learning, ``test`` for test-time adaptation).

    **When a fixed stage is checked.** The baseline is taken at the stage's first batch and compared after
    its last batch (and every ``check_every_n_batches``). A weight swap done by a hook before the first
    batch and undone after the last (EMA or ``WeightAveraging`` evaluation swaps, on the stage or epoch
    hooks) is therefore never a violation, whatever the callback order.

    **Frozen tensors in training.** Before the first optimizer step, frozen parameters that still have
    ``requires_grad=True`` or are held by an optimizer (where weight decay and momentum move them even
    with zero gradients), and frozen BatchNorm layers in train mode, are violations: with
    ``on_violation="raise"`` the run stops before any update. During training, an unfreeze (a
    ``requires_grad`` flip or a frozen parameter added to an optimizer) is caught at an epoch's first
    batch or before the next optimizer step, by identity and flags only (microseconds), before the
    unfrozen tensors are updated, and reported with its cause when known. An unfreeze is declared by a
    ``frozen`` entry's
    ``until_epoch``/``until_step``, or, with ``follow_finetuning``, by Lightning's ``BaseFinetuning``
    callbacks (``BackboneFinetuning``) on the Trainer: those tensors are released (an info
    ``frozen_released`` event) and never checked or restored again in that fit. The frozen tensors are
    compared after the first optimizer step, after the first step that follows any change of the frozen
    set, at every epoch end and every ``check_every_n_batches``; one check costs one fingerprint of the
    frozen tensors (see the README's benchmark). A change made after the last training epoch ends (the
    copy of the averaged weights into the model by ``WeightAveraging`` at ``on_train_end``) is outside the
    training stage and is not reported.

    In a multi-process run, the unfreeze watch runs at the checks and at each epoch's first batch (all ranks
    together, gathered), not at every step: a collective per step would cost a host synchronisation.

    Checkpoints keep the counts of the phase report and the frozen tensors already reported in ``fit``, so a
    fit resumed from one counts on and reports a drifting frozen tensor once, as an uninterrupted fit does.

    Args:
        stages: Narrow the checked stages to these; ``None`` (default): every stage declared ``parameters:
            fixed``, and, when ``frozen`` is set, every stage declared ``updated``.
        frozen: Tensors that must stay fixed in the stages declared ``updated`` too: name patterns
            (``fnmatch``, or a module prefix; any name of a tied weight), e.g. ``["backbone.*"]``, or
            mappings with a declared end, ``{"pattern": "backbone.*", "until_epoch": 5}`` (or
            ``until_step``). A pattern that matches nothing is an error at setup.
        exclude: Name patterns taken out of ``frozen``, e.g. ``frozen=["*"], exclude=["*lora_*"]`` for
            "everything but the LoRA adapters is frozen". A pattern that matches nothing is an error.
        include_buffers: Also check buffers (BatchNorm ``running_mean``, ``running_var``,
            ``num_batches_tracked``, and any other floating or integer buffer).
        on_violation: ``"raise"`` raises ``ParameterChangedError`` on every rank once the event is on disk;
            ``"warn"`` records the event and continues.
        check_every_n_batches: Also check every N batches within a stage (0: only at the points above).
        snapshot: ``"none"`` (default) keeps fingerprints only, 16 bytes per tensor. ``"cpu"`` or ``"device"``
            also keeps a copy of the weights there, so a violation reports the number of changed elements
            and the largest absolute difference, and ``restore`` can put the weights back.
        restore: Copy the snapshot back into changed tensors after reporting them (needs a ``snapshot``).
            Tensors whose declared freeze has ended are never restored.
        check_replicas: In DDP runs, verify that parameters are identical on all ranks at every check of a
            fixed stage and report ``replica_mismatch``. Not done for sharded strategies (FSDP, DeepSpeed),
            whose ranks hold different shards.
        follow_finetuning: Treat what a ``BaseFinetuning`` callback on the Trainer does as declared: the
            parameters it unfreezes at an epoch start are released, and the BatchNorm layers it leaves
            trainable (``train_bn=True``) are not frozen. ``False``: its unfreeze is a violation like any other.
        name: This instance's name in events, metric keys, alerts and report rows; by default the class name
            (made distinct when a Trainer holds several).
    """

    violation_error = ParameterChangedError
    declared_property: ClassVar[str] = "parameters"

    def __init__(
        self,
        stages: Sequence[Stage] | None = None,
        frozen: Sequence[str | FrozenSpec] = (),
        exclude: Sequence[str] = (),
        include_buffers: bool = True,
        on_violation: Literal["warn", "raise"] = "raise",
        check_every_n_batches: NonNegativeInt = 0,
        snapshot: Literal["none", "cpu", "device"] = "none",
        restore: bool = False,
        check_replicas: bool = True,
        follow_finetuning: bool = True,
        name: str | None = None,
    ) -> None:
        self.rules = frozen_rules("frozen", frozen)
        self.frozen = tuple(rule.pattern for rule in self.rules)
        self.exclude = check_texts("exclude", exclude, "['*lora_*']")
        if self.exclude and not self.rules:
            raise ValueError(f"exclude={list(self.exclude)!r} takes tensors out of `frozen`, which is empty.")
        super().__init__(stages=stages, on_violation=on_violation, name=name)
        self.include_buffers = check_bool("include_buffers", include_buffers)
        self.check_every_n_batches = check_positive(
            "check_every_n_batches", check_every_n_batches, allow_zero=True, integer=True
        )
        self.snapshot: Snapshot = check_choice("snapshot", snapshot, ("none", "cpu", "device"))  # type: ignore[assignment]
        self.restore = check_bool("restore", restore)
        if self.restore and self.snapshot == "none":
            raise ValueError("restore=True needs a copy to restore from; set snapshot='cpu' or snapshot='device'.")
        self.check_replicas = check_bool("check_replicas", check_replicas)
        self.follow_finetuning = check_bool("follow_finetuning", follow_finetuning)
        self._runs: dict[Stage, _StageRun] = {}
        self._frozen_names: list[str] = []
        self._rules_of: dict[str, list[FrozenRule]] = {}
        self._aliases: dict[str, list[str]] = {}
        self._scheduled: list[str] = []
        self._watched: dict[str, nn.Parameter] | None = None  # the frozen parameters still watched, by name
        self._tally: dict[tuple[Stage, str], _Tally] = {}
        self._watch = _TrainableWatch()
        self._reported_before: set[str] = set()  # frozen tensors reported in fit before the checkpoint resumed from

    @override
    def declared_stages(self, table: PhaseTable) -> tuple[Stage, ...]:
        return table.stages_where(parameters=("fixed", "updated") if self.frozen else "fixed")

    @override
    def describe(self) -> str:
        return "frozen" if self.frozen else "fixed"

    def _scope(self, stage: Stage) -> str:
        return "fixed" if self.table[stage].parameters == "fixed" else "frozen"

    # Setup: which tensors are frozen -------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._runs.clear()
        self._reported_before = set()
        aliases = tensor_names(pl_module, self.include_buffers)
        self._aliases = {}
        for alias, first in aliases.items():
            if alias != first:
                self._aliases.setdefault(first, []).append(alias)
        self._rules_of = {}
        unused: list[str] = []
        for rule in self.rules:
            names, missing = match_patterns(aliases, [rule.pattern])
            unused += missing
            for name in names:
                self._rules_of.setdefault(name, []).append(rule)
        self._frozen_names, missing = match_patterns(aliases, self.frozen, self.exclude)
        unused += [pattern for pattern in missing if pattern in self.exclude]
        self._rules_of = {name: self._rules_of[name] for name in self._frozen_names}
        # only tensors whose every rule has an end can be released by the schedule: the per-batch look is at them
        self._scheduled = [
            name
            for name in self._frozen_names
            if all(rule.until_epoch is not None or rule.until_step is not None for rule in self._rules_of[name])
        ]
        self._watched = None
        if unused:
            roots = sorted({name.split(".")[0] for name in aliases})
            hints = "".join(suggestion(pattern.split(".")[0], roots) for pattern in unused[:1])
            raise PhaseUsageError(
                f"{self.name}: frozen/exclude pattern(s) {', '.join(map(repr, unused))} match no parameter or "
                f"buffer of {type(pl_module).__name__}{hints}; names look like: {', '.join(list(aliases)[:5])}. "
                "Patterns are fnmatch globs or module prefixes, e.g. 'backbone.*' or 'backbone'."
            )
        self._watch = _TrainableWatch()

    def _tensors(self, pl_module: pl.LightningModule, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        tensors = named_tensors(pl_module, self.include_buffers)
        return tensors if names is None else {n: tensors[n] for n in names if n in tensors}

    def _active_frozen(self) -> list[str]:
        return [name for name in self._frozen_names if name not in self._watch.released]

    # Training: pre-flight, the unfreeze watch, declared releases ---------------------------------------

    def _finetuners(self, trainer: pl.Trainer) -> list[BaseFinetuning]:
        return [callback for callback in trainer.callbacks if isinstance(callback, BaseFinetuning)]

    def _managed(self, finetuner: BaseFinetuning, pl_module: pl.LightningModule, names: Sequence[str]) -> list[str]:
        """The ``names`` a finetuning callback freezes and unfreezes: ``BackboneFinetuning`` manages
        ``pl_module.backbone``; of any other ``BaseFinetuning`` the modules are not known, so all of them."""
        if isinstance(finetuner, BackboneFinetuning):
            backbone = getattr(pl_module, "backbone", None)
            if not isinstance(backbone, nn.Module):
                return []
            ids = {id(t) for t in backbone.parameters()} | {id(t) for t in backbone.buffers()}
            tensors = named_tensors(pl_module, self.include_buffers)
            return [name for name in names if name in tensors and id(tensors[name]) in ids]
        return list(names)

    def _acting_finetuners(self, trainer: pl.Trainer) -> list[BaseFinetuning]:
        """The finetuning callbacks that may have changed the trainable set at this epoch's start."""
        acting = []
        for finetuner in self._finetuners(trainer):
            at = getattr(finetuner, "unfreeze_backbone_at_epoch", None)
            if not isinstance(finetuner, BackboneFinetuning) or at == trainer.current_epoch:
                acting.append(finetuner)
        return acting

    def _preflight(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before the first optimizer step of a fit (also a resumed one): declared ends already passed,
        BatchNorm layers a finetuning callback leaves trainable, then what is still trainable or held.
        The frozen tensors are compared after the first optimizer step whatever is found."""
        self._release_ended(trainer)
        if self.follow_finetuning:
            modules = dict(pl_module.named_modules())
            for finetuner in self._finetuners(trainer):
                left = [
                    name
                    for name in self._managed(finetuner, pl_module, self._active_frozen())
                    if isinstance(modules.get(name.rpartition(".")[0]), nn.modules.batchnorm._BatchNorm)
                    and _module_trainable(modules[name.rpartition(".")[0]])
                ]
                if left:
                    self._release(
                        trainer,
                        left,
                        f"BatchNorm layers left trainable by {_describe_finetuner(finetuner)} "
                        "(BaseFinetuning.freeze keeps BatchNorm trainable unless told train_bn=False)",
                    )
        self._watch_trainable(trainer, pl_module, "before the first optimizer step", epoch_start=False)
        self._watch.verify_after_step = trainer.global_step

    def _release_ended(self, trainer: pl.Trainer) -> None:
        epoch, step = trainer.current_epoch, trainer.global_step
        ended: dict[str, list[str]] = {}
        for name in self._scheduled:
            rules = self._rules_of[name]
            if name not in self._watch.released and all(rule.ended(epoch, step) for rule in rules):
                ended.setdefault(" and ".join(rule.describe() for rule in rules), []).append(name)
        for declared, names in ended.items():
            self._release(trainer, names, f"declared frozen {declared}")

    def _release(self, trainer: pl.Trainer, names: list[str], why: str) -> None:
        """End the freeze of ``names``: no longer watched, compared or restored in this fit."""
        for name in names:
            self._watch.released[name] = why
        run = self._runs.get("train")
        if run is not None and run.scope == "frozen":
            run.names = self._active_frozen()
            if run.outer is not None:
                run.outer.drop(names)
        self._watch.forget(names)
        self._watched = None
        self._watch.verify_after_step = trainer.global_step
        self.emit(
            trainer,
            "frozen_released",
            f"{len(names)} frozen tensor(s) may train from now on ({why}): {_names(names)}",
            {"tensors": names, "why": why},
            severity="info",
            stage="train",
        )

    def _watch_trainable(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str, epoch_start: bool
    ) -> None:
        """Report frozen parameters newly trainable or newly held by an optimizer (or release them when a
        finetuning callback acting at this epoch start did it and ``follow_finetuning`` is set).

        A frozen parameter held by an optimizer but not trainable is an info event: optimizers skip
        parameters whose gradient is ``None``; the step that would move it is caught by :meth:`_watch_grads`.
        """
        if epoch_start or when == "before the first optimizer step":
            self._watched = None  # looked up again where parameters may have been replaced: between epochs
        watched = self._watched_params(pl_module)
        trainable, held = self._watch.news(trainer, watched)
        if trainer.world_size > 1:
            trainable, held = _gather_names(trainer, list(watched), trainable, held)
        new = [name for name in watched if name in trainable or name in held]
        if not new:
            return
        self._watch.seen(trainable, held)
        cause = None
        if epoch_start:
            acting = self._acting_finetuners(trainer) if self.follow_finetuning else []
            released: list[str] = []
            for finetuner in acting:
                mine = [name for name in self._managed(finetuner, pl_module, new) if name not in released]
                if mine:
                    why = (
                        f"unfrozen by {_describe_finetuner(finetuner)}'s finetune_function at the start of "
                        f"epoch {trainer.current_epoch}"
                    )
                    self._release(trainer, mine, why)
                    released += mine
            new = [name for name in new if name not in released]
            if not new:
                return
            finetuners = self._acting_finetuners(trainer)
            if finetuners and not self.follow_finetuning:
                cause = (
                    f"{_describe_finetuner(finetuners[0])}'s finetune_function at the start of epoch "
                    f"{trainer.current_epoch}"
                )
            else:
                cause = f"a hook between the last step and the first batch of epoch {trainer.current_epoch}"
        elif when != "before the first optimizer step":
            cause = f"during step {trainer.global_step} (training_step, a hook or an optimizer change)"
        self._watch.verify_after_step = trainer.global_step
        because = f"; cause: {cause}" if cause else ""
        violations = []
        names = [name for name in new if name in trainable]
        if names:
            violations.append(
                self.emit(
                    trainer,
                    "frozen_param_trainable",
                    f"{len(names)} frozen parameter(s) have requires_grad=True {when}{because}: {self._shown(names)}",
                    {"tensors": names, "when": when, "cause": cause},
                    stage="train",
                )
            )
        for graded in (True, False):
            names = [name for name in new if name in held and watched[name].requires_grad == graded]
            if not names:
                continue
            message = (
                f"{len(names)} frozen parameter(s) are held by an optimizer {when}"
                + (
                    ", where they train and weight decay or momentum move them"
                    if graded
                    else " (not trainable: the optimizer skips them while their gradient is None; a zero "
                    "gradient instead of None would let weight decay move them, which is then a violation)"
                )
                + f"{because}: {self._shown(names)}"
            )
            event = self.emit(
                trainer,
                "frozen_param_in_optimizer",
                message,
                {"tensors": names, "where": {n: held[n] for n in names}, "when": when, "cause": cause},
                severity=None if graded else "info",
                stage="train",
            )
            if graded:
                violations.append(event)
        if violations:
            self.act(trainer, violations[0])

    def _watched_params(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        """The frozen parameters still watched, by name (cached: the per-step watch only reads their flags)."""
        if self._watched is None:
            params = dict(pl_module.named_parameters())
            self._watched = {name: params[name] for name in self._active_frozen() if name in params}
        return self._watched

    def _watch_grads(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Before an optimizer step: a frozen parameter held by the optimizer that has a gradient (a zero
        one counts) will be moved by this step; that is a violation, raised before the step."""
        params = self._watched_params(pl_module)
        graded = [
            name
            for name in self._watch.held
            if name in params and params[name].grad is not None and name not in self._watch.graded
        ]
        if not graded:
            return
        self._watch.graded |= set(graded)
        self._watch.verify_after_step = trainer.global_step
        self.violation(
            trainer,
            "frozen_param_in_optimizer",
            f"{len(graded)} frozen parameter(s) held by an optimizer have a gradient before optimizer step "
            f"{trainer.global_step}, so this step moves them (weight decay and momentum act on zero gradients "
            f"too): {self._shown(graded)}",
            {"tensors": graded, "when": f"before optimizer step {trainer.global_step}", "cause": "gradient set"},
            stage="train",
        )

    def _shown(self, names: Sequence[str]) -> str:
        """Names for a message, each tied weight with its other names."""
        return _names([f"{n} (= {', '.join(self._aliases[n])})" if n in self._aliases else n for n in names])

    def _check_frozen_batchnorm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frozen = set(self._active_frozen())
        training = [
            name
            for name, module in pl_module.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.training
            and module.track_running_stats
            and any(f"{name}.{p}" in frozen for p, _ in module.named_parameters(recurse=False))
        ]
        if training and "frozen batchnorm" not in self._warned:
            self._warned.add("frozen batchnorm")
            self.violation(
                trainer,
                "frozen_batchnorm_training",
                f"frozen BatchNorm layer(s) {_names(training)} are in train mode, so their running statistics "
                "change at every batch; call .eval() on them in on_train_start and on_train_epoch_start "
                "(Lightning skips on_train_epoch_start when a fit resumes mid-epoch)",
                {"modules": training},
                stage="train",
            )

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        run = self._runs.get("train")
        if run is not None and run.scope == "frozen" and trainer.world_size == 1:
            self._guarded(
                trainer,
                "on_before_optimizer_step",
                self._watch_trainable,
                trainer,
                pl_module,
                f"before optimizer step {trainer.global_step}",
                False,
            )
            self._guarded(trainer, "on_before_optimizer_step", self._watch_grads, trainer, pl_module)

    # Stage checks -------------------------------------------------------------------------------------

    @override
    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if stage not in self.stages:
            return
        scope = self._scope(stage)
        if scope == "frozen":
            if not self._frozen_names:
                return
            self._runs[stage] = _StageRun(scope, self._active_frozen())
            if stage == "train":
                self._watch.first_batch = True
                self._runs[stage].reported, self._reported_before = self._reported_before, set()
                self._preflight(trainer, pl_module)
            return
        self._runs[stage] = _StageRun(scope, None)
        self._check_replicas(trainer, pl_module, stage)

    @override
    def on_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, batch: Any, batch_idx: int
    ) -> None:
        run = self._runs.get(stage)
        if run is None:
            return
        if run.scope == "frozen" and stage == "train":
            self._release_ended(trainer)
            if batch_idx == 0 or self._watch.first_batch:  # later flips: before the next optimizer step
                self._watch_trainable(trainer, pl_module, f"at step {trainer.global_step}", epoch_start=True)
            if self._watch.first_batch:
                self._watch.first_batch = False
                self._check_frozen_batchnorm(trainer, pl_module)
        if run.outer is None:
            run.outer = FreezeBaseline(self._tensors(pl_module, run.names), self.snapshot)
            self._report_unverifiable(trainer, stage, run.outer)
        if self.check_every_n_batches and run.scope == "fixed" and run.inner is None:
            run.inner = FreezeBaseline(self._tensors(pl_module), self.snapshot)

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
        run = self._runs.get(stage)
        if run is None or run.outer is None:
            return
        n = self.check_every_n_batches
        due = bool(n) and (batch_idx + 1) % n == 0
        if run.scope == "frozen" and stage == "train":
            stepped = self._watch.verify_after_step is not None and trainer.global_step > self._watch.verify_after_step
            if stepped:
                self._watch.verify_after_step = None
            if due or stepped:
                self._verify(trainer, pl_module, stage, run, run.outer, f"batch {batch_idx}")
            return
        if due and run.scope == "frozen":
            self._verify(trainer, pl_module, stage, run, run.outer, f"batch {batch_idx}")
        elif (
            due
            and run.inner is not None
            and self._verify(trainer, pl_module, stage, run, run.inner, f"batch {batch_idx}")
        ):
            run.inner = FreezeBaseline(self._tensors(pl_module), self.snapshot)  # one change, one report
        if _is_last_batch(trainer, stage):
            run.finished = True
            self._verify(trainer, pl_module, stage, run, run.outer, "after the last batch")

    @override
    def on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        run = self._runs.get("train")
        if run is not None and run.scope == "frozen" and run.outer is not None:
            self._verify(trainer, pl_module, "train", run, run.outer, "epoch end")

    @override
    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        run = self._runs.pop(stage, None)
        if run is None:
            return
        if stage != "train" and run.outer is not None and not run.finished:  # the last batch was not identifiable
            self._verify(trainer, pl_module, stage, run, run.outer, "stage end")
        if run.scope == "fixed":
            self._check_replicas(trainer, pl_module, stage)

    @override
    def on_call_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException | None) -> None:
        """After an exception, compare once what the interrupted stages changed, then let it propagate.

        The events are on disk before the exception reaches the user; nothing is raised here (the original
        exception is what the user must see). In a multi-process run only this rank's tensors are compared:
        the other ranks may not be here to gather with.
        """
        runs, self._runs = self._runs, {}
        if exception is None or isinstance(exception, ParameterChangedError):
            return
        for stage, run in runs.items():
            if run.outer is not None and not run.finished:
                self._verify(trainer, pl_module, stage, run, run.outer, f"after {type(exception).__name__}", act=False)

    def _report_unverifiable(self, trainer: pl.Trainer, stage: Stage, baseline: FreezeBaseline) -> None:
        if baseline.unverifiable and "unverifiable" not in self._warned:
            self._warned.add("unverifiable")
            names = baseline.unverifiable
            self.emit(
                trainer,
                "tensor_unverifiable",
                f"{len(names)} tensor(s) cannot be fingerprinted (meta device or an unsupported layout) and are "
                f"not checked: {_names(names)}",
                {"tensors": names},
                severity="info",
                stage=stage,
            )

    # Verification, agreed across ranks -----------------------------------------------------------------

    def _verify(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: Stage,
        run: _StageRun,
        baseline: FreezeBaseline,
        when: str,
        act: bool = True,
    ) -> bool:
        """Compare with ``baseline``; report, restore and act on changes. Returns whether any changed.

        A tensor is reported once per stage run (in ``fit``, once per fit): a frozen weight that weight decay
        moves at every step is one event, not one per epoch. Every change is restored when ``restore`` is set,
        and, without it, frozen tensors are followed, so the tally counts each further movement.
        """
        frozen = run.scope == "frozen"
        if frozen and trainer.world_size > 1 and act and stage == "train":
            self._watch_trainable(trainer, pl_module, f"at step {trainer.global_step}", epoch_start=False)
        current = self._tensors(pl_module, run.names)
        local = baseline.compare(current)
        if act:
            changed, ranks, synced = self._gather_changes(trainer, pl_module, list(baseline.tensors), local)
        else:
            changed, ranks, synced = local, {change.name: [trainer.global_rank] for change in local}, set()
        changes = [change for change in changed if change.name not in run.reported]
        run.reported.update(change.name for change in changes)
        tally = self._tally.setdefault((stage, run.scope), _Tally())
        tally.checks += 1
        tally.unverifiable = len(baseline.unverifiable)
        tally.changes += len(changed)
        tally.buffer_syncs += len(synced)
        self.log_metrics(trainer, {f"{stage}/changed_tensors": float(len(changed))})
        if not changed:
            return False
        restored = baseline.restore(current, [change.name for change in changed]) if self.restore else []
        if frozen and not self.restore and baseline is run.outer:
            run.outer = FreezeBaseline(self._tensors(pl_module, run.names), self.snapshot)
        if not changes:
            return True
        names = [change.name for change in changes]
        what = "frozen tensor(s)" if frozen else "tensor(s)"
        data: dict[str, Any] = {
            "tensors": names,
            "stage": stage,
            "check": when,
            "frozen": frozen,
            "changes": [change.as_dict() for change in changes],
            "restored": restored,
        }
        if trainer.world_size > 1:
            data["ranks"] = {name: ranks[name] for name in names}
        message = f"{len(names)} {what} changed during {stage} ({when}): {self._shown(names)}"
        event = self.emit(trainer, "param_changed", message, data, stage=stage)
        if act:
            self.act(trainer, event)
        return True

    def _gather_changes(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, names: list[str], local: list[TensorChange]
    ) -> tuple[list[TensorChange], dict[str, list[int]], set[str]]:
        """The union of every rank's changes (identical on all ranks), which ranks saw each, and the
        buffers whose change was DDP's copy of rank 0's buffers.

        Under DDP with ``broadcast_buffers`` (the default), every forward copies rank 0's buffers to the
        other ranks, so BatchNorm statistics that each rank updated on its own batches are overwritten on
        ranks 1..N at the next forward. A buffer that changed on other ranks only and now equals rank 0's
        is that copy, not a mutation, and is not reported.
        """
        if trainer.world_size == 1:
            return local, {change.name: [trainer.global_rank] for change in local}, set()
        device = _collective_device(trainer)
        index = {name: i for i, name in enumerate(names)}
        flags = torch.zeros(len(names) + 1, dtype=torch.int64, device=device)
        for change in local:
            flags[index.get(change.name, len(names))] = 1
        gathered = trainer.strategy.all_gather(flags).reshape(trainer.world_size, -1).cpu()
        ranks = {
            name: [rank for rank in range(trainer.world_size) if gathered[rank, i]]
            for i, name in enumerate(names)
            if gathered[:, i].any()
        }
        synced = self._broadcast_buffer_copies(trainer, pl_module, ranks)
        mine = {change.name: change for change in local}
        changes = [mine.get(name, TensorChange(name, "values")) for name in ranks if name not in synced]
        extra = [rank for rank in range(trainer.world_size) if gathered[rank, -1]]
        if extra:
            changes.append(TensorChange("<tensors added or removed>", "added/removed"))
            ranks["<tensors added or removed>"] = extra
        return changes, ranks, synced

    def _broadcast_buffer_copies(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ranks: dict[str, list[int]]
    ) -> set[str]:
        """Buffers changed on ranks other than 0 only, that now equal rank 0's (DDP's buffer broadcast)."""
        strategy = trainer.strategy
        if not _replicated(strategy) or not getattr(strategy, "_ddp_kwargs", {}).get("broadcast_buffers", True):
            return set()
        buffers = dict(pl_module.named_buffers())
        candidates = [name for name, seen in ranks.items() if name in buffers and 0 not in seen]
        if not candidates:  # identical on all ranks, since ``ranks`` is
            return set()
        prints = fingerprints([buffers[name] for name in candidates]).to(_collective_device(trainer))
        gathered = strategy.all_gather(prints).reshape(trainer.world_size, -1).cpu()
        synced = {name for i, name in enumerate(candidates) if bool((gathered[:, i] == gathered[0, i]).all())}
        return synced

    def _check_replicas(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if not self.check_replicas or trainer.world_size == 1 or not _replicated(trainer.strategy):
            return
        params = dict(pl_module.named_parameters())
        prints = fingerprints(list(params.values())).to(_collective_device(trainer))
        gathered = trainer.strategy.all_gather(prints).reshape(trainer.world_size, -1).cpu()
        tally = self._tally.setdefault((stage, "replicas"), _Tally())
        tally.checks += 1
        mismatched: dict[str, list[list[int]]] = {}
        for i, name in enumerate(params):
            groups: dict[int, list[int]] = {}
            for rank in range(trainer.world_size):
                groups.setdefault(int(gathered[rank, i]), []).append(rank)
            if len(groups) > 1:
                mismatched[name] = sorted(groups.values())
        if not mismatched:
            return
        tally.changes += len(mismatched)
        names = list(mismatched)
        self.violation(
            trainer,
            "replica_mismatch",
            f"{len(names)} parameter(s) differ between data-parallel ranks during {stage}: {_names(names)}",
            {"tensors": names, "stage": stage, "rank_groups": mismatched},
            stage=stage,
        )

    # Report -------------------------------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        train = self._runs.get("train")
        return {
            "tally": [[stage, what, asdict(tally)] for (stage, what), tally in self._tally.items()],
            "reported_in_fit": sorted(train.reported) if train is not None else [],
            "released": dict(self._watch.released),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._tally = {(stage, what): _Tally(**tally) for stage, what, tally in state_dict.get("tally", [])}
        self._reported_before = set(state_dict.get("reported_in_fit", []))
        self._watch.released.update(state_dict.get("released", {}))  # a declared unfreeze stays declared

    @override
    def phase_observations(self) -> list[Observation]:
        labels = {"fixed": "parameters fixed", "frozen": "frozen parameters fixed", "replicas": "replicas identical"}
        rows = []
        for (stage, what), tally in self._tally.items():
            verdict = "violated" if tally.changes else "verified"
            detail = f"{tally.checks} checks, {tally.changes} {'mismatches' if what == 'replicas' else 'changes'}"
            if tally.buffer_syncs:
                detail += f", {tally.buffer_syncs} buffer copies from rank 0 by DDP (broadcast_buffers) not counted"
            if tally.unverifiable:
                detail += f", {tally.unverifiable} tensors not verifiable (meta device or unsupported layout)"
            rows.append(Observation(stage, labels[what], verdict, detail))
        return rows


class _TrainableWatch:
    """What the unfreeze watch of one fit knows: released names, what was already reported, and the
    optimizers' last seen layout (so the held set is recomputed only when a param group changes)."""

    def __init__(self) -> None:
        self.released: dict[str, str] = {}
        self.trainable: set[str] = set()
        self.held: set[str] = set()
        self.graded: set[str] = set()
        self.first_batch = False
        self.verify_after_step: int | None = None
        self._layout: tuple[Any, ...] | None = None
        self._held_now: dict[str, list[str]] = {}

    def news(self, trainer: pl.Trainer, watched: dict[str, nn.Parameter]) -> tuple[set[str], dict[str, list[str]]]:
        """Watched parameters newly trainable, and newly held (with where), since last reported."""
        trainable = {name for name, param in watched.items() if param.requires_grad} - self.trainable
        layout = tuple(
            (id(optimizer), tuple((id(group["params"]), len(group["params"])) for group in optimizer.param_groups))
            for optimizer in trainer.optimizers
        )
        if layout != self._layout:
            self._layout = layout
            by_id = {id(param): name for name, param in watched.items()}
            held: dict[str, list[str]] = {}
            for opt_index, optimizer in enumerate(trainer.optimizers):
                for group_index, group in enumerate(optimizer.param_groups):
                    for param in group["params"]:
                        if id(param) in by_id:
                            held.setdefault(by_id[id(param)], []).append(f"optimizer {opt_index} group {group_index}")
            self._held_now = held
        held_new = {name: where for name, where in self._held_now.items() if name in watched and name not in self.held}
        return trainable, held_new

    def seen(self, trainable: set[str], held: dict[str, list[str]]) -> None:
        """Remember what was reported, so it is reported once."""
        self.trainable |= set(trainable)
        self.held |= set(held)

    def forget(self, names: Sequence[str]) -> None:
        """Released names are no longer watched; the held set is recomputed at the next look."""
        self.trainable -= set(names)
        self.held -= set(names)
        self._layout = None


def _module_trainable(module: nn.Module) -> bool:
    return any(param.requires_grad for param in module.parameters(recurse=False))


def _describe_finetuner(callback: BaseFinetuning) -> str:
    at = getattr(callback, "unfreeze_backbone_at_epoch", None)
    return f"{type(callback).__name__}(unfreeze_backbone_at_epoch={at})" if at is not None else type(callback).__name__


def _gather_names(
    trainer: pl.Trainer, names: list[str], trainable: set[str], held: dict[str, list[str]]
) -> tuple[set[str], dict[str, list[str]]]:
    """The union over ranks of newly trainable and newly held names (the same on every rank)."""
    flags = torch.zeros(2, len(names) + 1, dtype=torch.int64, device=_collective_device(trainer))
    for i, name in enumerate(names):
        flags[0, i] = name in trainable
        flags[1, i] = name in held
    gathered = trainer.strategy.all_gather(flags).reshape(trainer.world_size, 2, -1).cpu().amax(dim=0)
    trainable_all = {name for i, name in enumerate(names) if gathered[0, i]}
    held_all = {
        name: held.get(name, ["an optimizer on another rank"]) for i, name in enumerate(names) if gathered[1, i]
    }
    return trainable_all, held_all


def _is_last_batch(trainer: pl.Trainer, stage: Stage) -> bool:
    """Whether the evaluation batch that just ended is the stage's last (Lightning's loop knows)."""
    try:
        loop = trainer.predict_loop if stage == "predict" else trainer._evaluation_loop
    except RuntimeError:
        return False
    progress = getattr(loop, "batch_progress", None)
    return bool(getattr(progress, "is_last_batch", False))


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _replicated(strategy: Any) -> bool:
    """DDP replicates every parameter on every rank; FSDP and DeepSpeed shard them."""
    return isinstance(strategy, DDPStrategy) and "DeepSpeed" not in type(strategy).__name__


def _collective_device(trainer: pl.Trainer) -> torch.device:
    """The device collectives run on (gloo: CPU; NCCL: the rank's GPU)."""
    return trainer.strategy.root_device
