"""``ParamFreezeAssertion``: proves parameters and buffers stay bit-for-bit fixed where declared fixed."""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from typing_extensions import override

from lightning_phases.callbacks.base import PhaseCallback
from lightning_phases.detectors.fingerprint import fingerprints
from lightning_phases.detectors.freeze import FreezeBaseline, Snapshot, TensorChange, match_patterns, named_tensors
from lightning_phases.exceptions import ParameterChangedError
from lightning_phases.phases import PhaseTable, Stage
from lightning_phases.reporting.report_model import Observation
from lightning_phases.validation import NonNegativeInt, check_bool, check_choice, check_positive, check_texts


@dataclass
class _Tally:
    checks: int = 0
    changes: int = 0
    unverifiable: int = 0
    buffer_syncs: int = 0


@dataclass
class _StageRun:
    """The baselines of one running stage: ``fixed`` (every tensor) or ``frozen`` (the frozen ones only)."""

    scope: str
    names: list[str] | None  # None: every tensor
    outer: FreezeBaseline  # from the stage's start
    inner: FreezeBaseline | None = None  # from the last in-stage check
    reported: set[str] = field(default_factory=set)


class ParamFreezeAssertion(PhaseCallback):
    """Verify that parameters and buffers do not change, bit for bit, in stages declared fixed.

    When a checked stage starts, every parameter (and buffer) is fingerprinted on its own device with a
    position-weighted 64-bit sum of its bits: no copy of the weights, one host synchronisation per check.
    When the stage ends (and every ``check_every_n_batches`` batches) the fingerprints are compared; any
    changed bit in any element (``-0.0`` vs ``0.0``, NaN payloads, two swapped elements) is reported by
    tensor name. In multi-process runs every rank's findings are gathered, so all ranks emit the same event
    and raise together, and parameters are compared across data-parallel replicas.

    Which stages are checked comes from the declared phase table (:class:`~lightning_phases.Phases`): every
    tensor in the stages declared ``parameters: fixed`` (by default ``sanity_check``, ``validate``, ``test``,
    ``predict``), and the tensors matching ``frozen`` in the stages declared ``updated`` (``train``; and e.g.
    ``predict`` for online learning, ``test`` for test-time adaptation). At the start of training, frozen
    parameters that still have ``requires_grad=True`` or are still held by an optimizer are reported, and
    frozen BatchNorm layers left in train mode are warned about.

    Checkpoints keep the counts of the phase report and the frozen tensors already reported in ``fit``, so a
    fit resumed from one counts on and reports a drifting frozen tensor once, as an uninterrupted fit does.

    Callbacks that swap weights on purpose around validation (Lightning's ``WeightAveraging``/EMA swap in
    ``on_validation_epoch_start`` and back in ``on_validation_epoch_end``) cause no false positive: the
    stage-end check compares the live weights after the swap back with those before it, and the
    in-stage checks (``check_every_n_batches``) compare with the weights in use at the stage's first batch.

    Args:
        stages: Narrow the checked stages to these; ``None`` (default): every stage declared ``parameters:
            fixed``, and, when ``frozen`` is set, every stage declared ``updated``.
        frozen: Name patterns (``fnmatch``, or a module prefix) of tensors that must stay fixed in the stages
            declared ``updated`` too, e.g. ``["backbone.*"]``. A pattern that matches nothing is warned about
            once.
        include_buffers: Also check buffers (BatchNorm ``running_mean``, ``running_var``,
            ``num_batches_tracked``, and any other floating or integer buffer).
        on_violation: ``"raise"`` raises ``ParameterChangedError`` on every rank once the event is on disk;
            ``"warn"`` records the event and continues.
        check_every_n_batches: Also check every N batches within a stage (0: only at stage start and end).
        snapshot: ``"none"`` (default) keeps fingerprints only, 16 bytes per tensor. ``"cpu"`` or ``"device"``
            also keeps a copy of the weights there, so a violation reports the number of changed elements
            and the largest absolute difference, and ``restore`` can put the weights back.
        restore: Copy the snapshot back into changed tensors after reporting them (needs a ``snapshot``).
        check_replicas: In DDP runs, verify that parameters are identical on all ranks at every check of a
            fixed stage and report ``replica_mismatch``. Not done for sharded strategies (FSDP, DeepSpeed),
            whose ranks hold different shards.
        name: This instance's name in events, metric keys, alerts and report rows; by default the class name
            (made distinct when a Trainer holds several).
    """

    violation_error = ParameterChangedError
    declared_property: ClassVar[str] = "parameters"

    def __init__(
        self,
        stages: Sequence[Stage] | None = None,
        frozen: Sequence[str] = (),
        include_buffers: bool = True,
        on_violation: Literal["warn", "raise"] = "raise",
        check_every_n_batches: NonNegativeInt = 0,
        snapshot: Literal["none", "cpu", "device"] = "none",
        restore: bool = False,
        check_replicas: bool = True,
        name: str | None = None,
    ) -> None:
        self.frozen = check_texts("frozen", frozen, "['backbone.*']")
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
        self._runs: dict[Stage, _StageRun] = {}
        self._frozen_names: list[str] = []
        self._tally: dict[tuple[Stage, str], _Tally] = {}
        self._reported_before: set[str] = set()  # frozen tensors reported in fit before the checkpoint resumed from

    @override
    def declared_stages(self, table: PhaseTable) -> tuple[Stage, ...]:
        return table.stages_where(parameters=("fixed", "updated") if self.frozen else "fixed")

    @override
    def describe(self) -> str:
        return "frozen" if self.frozen else "fixed"

    def _scope(self, stage: Stage) -> str:
        return "fixed" if self.table[stage].parameters == "fixed" else "frozen"

    # Setup and fit-time frozen checks ------------------------------------------------------------------

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._runs.clear()
        self._reported_before = set()
        names = named_tensors(pl_module, self.include_buffers)
        self._frozen_names, unused = match_patterns(names, self.frozen)
        if unused:
            example = ", ".join(list(names)[:5])
            self.warn_once(
                "unused patterns",
                f"frozen pattern(s) {', '.join(map(repr, unused))} match no parameter or buffer of "
                f"{type(pl_module).__name__}; names look like: {example}.",
            )

    def _tensors(self, pl_module: pl.LightningModule, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        tensors = named_tensors(pl_module, self.include_buffers)
        return tensors if names is None else {n: tensors[n] for n in names if n in tensors}

    def _check_frozen_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        frozen_params = [n for n in self._frozen_names if n in params]
        trainable = [n for n in frozen_params if params[n].requires_grad]
        if trainable:
            self.emit(
                trainer,
                "frozen_param_trainable",
                f"{len(trainable)} frozen parameter(s) still have requires_grad=True: {_names(trainable)}",
                {"tensors": trainable},
                stage="train",
            )
        by_id = {id(params[n]): n for n in frozen_params}
        held: dict[str, list[str]] = {}
        for opt_index, optimizer in enumerate(trainer.optimizers):
            for group_index, group in enumerate(optimizer.param_groups):
                for param in group["params"]:
                    if id(param) in by_id:
                        held.setdefault(by_id[id(param)], []).append(f"optimizer {opt_index} group {group_index}")
        if held:
            self.emit(
                trainer,
                "frozen_param_in_optimizer",
                f"{len(held)} frozen parameter(s) are still held by an optimizer, where weight decay or "
                f"momentum can move them: {_names(list(held))}",
                {"tensors": list(held), "where": held},
                stage="train",
            )

    def _check_frozen_batchnorm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frozen = set(self._frozen_names)
        training = [
            name
            for name, module in pl_module.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            and module.training
            and any(f"{name}.{p}" in frozen for p, _ in module.named_parameters(recurse=False))
        ]
        if training and "frozen batchnorm" not in self._warned:
            self._warned.add("frozen batchnorm")
            self.emit(
                trainer,
                "frozen_batchnorm_training",
                f"frozen BatchNorm layer(s) {_names(training)} are in train mode, so their running statistics "
                "still change; call .eval() on them in on_train_epoch_start",
                {"modules": training},
                severity="warning",
                stage="train",
            )

    # Stage checks -------------------------------------------------------------------------------------

    @override
    def on_stage_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        if stage not in self.stages:
            return
        scope = self._scope(stage)
        if scope == "frozen":
            if not self._frozen_names:
                return
            if stage == "train":
                self._check_frozen_setup(trainer, pl_module)
        names = self._frozen_names if scope == "frozen" else None
        self._runs[stage] = _StageRun(scope, names, FreezeBaseline(self._tensors(pl_module, names), self.snapshot))
        if stage == "train":
            self._runs[stage].reported, self._reported_before = self._reported_before, set()
        if scope == "fixed":
            self._check_replicas(trainer, pl_module, stage)

    @override
    def on_stage_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        run = self._runs.pop(stage, None)
        if run is None:
            return
        self._verify(trainer, pl_module, stage, run, run.outer, "stage end")
        if run.scope == "fixed":
            self._check_replicas(trainer, pl_module, stage)

    @override
    def on_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, batch: Any, batch_idx: int
    ) -> None:
        run = self._runs.get(stage)
        if run is None:
            return
        if run.scope == "frozen" and stage == "train" and batch_idx == 0:
            self._check_frozen_batchnorm(trainer, pl_module)
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
        n = self.check_every_n_batches
        run = self._runs.get(stage)
        if run is None or not n or (batch_idx + 1) % n:
            return
        if run.scope == "fixed" and run.inner is not None:
            if self._verify(trainer, pl_module, stage, run, run.inner, f"batch {batch_idx}"):
                run.inner = FreezeBaseline(self._tensors(pl_module), self.snapshot)  # one change, one report
        elif run.scope == "frozen":
            self._verify(trainer, pl_module, stage, run, run.outer, f"batch {batch_idx}")

    @override
    def on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage) -> None:
        run = self._runs.get("train")
        if run is not None and run.scope == "frozen":
            self._verify(trainer, pl_module, "train", run, run.outer, "epoch end")

    # Verification, agreed across ranks -----------------------------------------------------------------

    def _verify(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        stage: Stage,
        run: _StageRun,
        baseline: FreezeBaseline,
        when: str,
    ) -> bool:
        """Compare with ``baseline``; report, restore and act on changes. Returns whether any changed.

        A tensor is reported once per stage run (in ``fit``, once per fit): a frozen weight that weight decay
        moves at every step is one event, not one per epoch. Every change is restored when ``restore`` is set,
        and, without it, frozen tensors are followed, so the tally counts each further movement.
        """
        frozen = run.scope == "frozen"
        current = self._tensors(pl_module, run.names)
        local = baseline.compare(current)
        changed, ranks, synced = self._gather_changes(trainer, pl_module, list(baseline.tensors), local)
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
        if frozen and not self.restore:
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
        message = f"{len(names)} {what} changed during {stage} ({when}): {_names(names)}"
        self.violation(trainer, "param_changed", message, data, stage=stage)
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
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._tally = {(stage, what): _Tally(**tally) for stage, what, tally in state_dict.get("tally", [])}
        self._reported_before = set(state_dict.get("reported_in_fit", []))

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
                detail += f", {tally.unverifiable} meta tensors not verifiable"
            rows.append(Observation(stage, labels[what], verdict, detail))
        return rows


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _replicated(strategy: Any) -> bool:
    """DDP replicates every parameter on every rank; FSDP and DeepSpeed shard them."""
    return isinstance(strategy, DDPStrategy) and "DeepSpeed" not in type(strategy).__name__


def _collective_device(trainer: pl.Trainer) -> torch.device:
    """The device collectives run on (gloo: CPU; NCCL: the rank's GPU)."""
    return trainer.strategy.root_device
