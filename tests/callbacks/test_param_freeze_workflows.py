"""ParamFreezeAssertion in fine-tuning workflows: schedules, BackboneFinetuning, LoRA, EMA swaps, stop before
damage, tied and sparse tensors, resume and the exception path. Each detector test runs the clean case too."""

import warnings
from contextlib import contextmanager

import lightning.pytorch as pl
import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import read_jsonl, small_trainer
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint
from torch import nn
from typing_extensions import override

from lightning_phases import ParameterChangedError, ParamFreezeAssertion, PhaseWarning
from lightning_phases.detectors.freeze import FreezeBaseline, match_patterns, named_tensors, tensor_names


def trainer(callbacks, tmp_path, **kwargs):
    return small_trainer(callbacks, default_root_dir=tmp_path, **kwargs)


def events(tmp_path, kind=None):
    path = tmp_path / "phase_events.jsonl"
    lines = read_jsonl(path) if path.exists() else []
    return [e for e in lines if kind is None or e["kind"] == kind]


def flags(tmp_path):
    """Every event that is not info: what a user is alerted about."""
    return [e for e in events(tmp_path) if e["severity"] != "info"]


@contextmanager
def quiet():
    """Warn-mode findings are asserted from the event log; their console warnings are not the point here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        yield


class Snapshots(pl.Callback):
    """Copies of the backbone at each train epoch end and at each train batch start."""

    def __init__(self):
        self.epoch_end: list[dict[str, torch.Tensor]] = []

    @override
    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_end.append({n: p.detach().clone() for n, p in pl_module.backbone.named_parameters()})


# BackboneFinetuning --------------------------------------------------------------------------------------


def test_backbone_finetuning_followed_is_silent_and_the_release_is_recorded(tmp_path):
    check = ParamFreezeAssertion(frozen=["backbone.*"])  # on_violation="raise": any finding would stop the fit
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    snaps = Snapshots()
    trainer([finetuning, check, snaps], tmp_path, max_epochs=3, limit_val_batches=0).fit(
        DigitsClassifier(), DigitsDataModule()
    )
    assert flags(tmp_path) == []
    released = events(tmp_path, "frozen_released")
    # BatchNorm left trainable by train_bn=True at fit start, then the rest of the backbone at epoch 1
    assert [e["epoch"] for e in released] == [0, 1]
    assert "train_bn" in released[0]["data"]["why"] and "backbone.1.weight" in released[0]["data"]["tensors"]
    assert "BackboneFinetuning(unfreeze_backbone_at_epoch=1)" in released[1]["message"]
    assert "backbone.0.weight" in released[1]["data"]["tensors"]
    # the fine-tuning really happened: the backbone's linear layer moved after its release
    assert not torch.equal(snaps.epoch_end[0]["0.weight"], snaps.epoch_end[2]["0.weight"])


def test_an_undeclared_backbone_unfreeze_stops_before_the_first_backbone_update_naming_it(tmp_path):
    check = ParamFreezeAssertion(frozen=["backbone.0.*"], follow_finetuning=False)
    snaps = Snapshots()
    model = DigitsClassifier()
    with pytest.raises(ParameterChangedError, match=r"BackboneFinetuning\(unfreeze_backbone_at_epoch=1\)") as info:
        trainer([BackboneFinetuning(unfreeze_backbone_at_epoch=1), check, snaps], tmp_path, max_epochs=3).fit(
            model, DigitsDataModule()
        )
    event = info.value.event
    assert event.kind == "frozen_param_trainable" and event.epoch == 1
    assert event.data["tensors"] == ["backbone.0.weight", "backbone.0.bias"]
    assert "start of epoch 1" in event.data["cause"]
    assert events(tmp_path)[-1]["kind"] == "frozen_param_in_optimizer"  # both findings are on disk
    # stopped before any update of the unfrozen tensors: they are what they were at the end of epoch 0
    assert len(snaps.epoch_end) == 1
    assert torch.equal(model.backbone[0].weight, snaps.epoch_end[0]["0.weight"])


def test_a_declared_until_epoch_schedule_is_silent_and_an_early_unfreeze_is_caught(tmp_path):
    class Unfreezes(DigitsClassifier):
        def __init__(self, at_epoch):
            super().__init__(freeze_backbone=True)
            self.at_epoch = at_epoch

        @override
        def on_train_epoch_start(self):
            self.backbone.eval()
            if self.current_epoch == self.at_epoch:
                self.backbone.train().requires_grad_(True)
                self.trainer.optimizers[0].add_param_group({"params": list(self.backbone.parameters())})

    frozen = [{"pattern": "backbone.*", "until_epoch": 2}]
    trainer([ParamFreezeAssertion(frozen=frozen)], tmp_path, max_epochs=3, limit_val_batches=0).fit(
        Unfreezes(at_epoch=2), DigitsDataModule()
    )
    assert flags(tmp_path) == []
    [released] = events(tmp_path, "frozen_released")
    assert released["epoch"] == 2 and "'backbone.*' until epoch 2" in released["message"]

    early = tmp_path / "early"
    with pytest.raises(ParameterChangedError, match="epoch 1") as info:
        trainer([ParamFreezeAssertion(frozen=frozen)], early, max_epochs=3, limit_val_batches=0).fit(
            Unfreezes(at_epoch=1), DigitsDataModule()
        )
    assert info.value.event.kind == "frozen_param_trainable" and info.value.event.global_step == 5


def test_frozen_schedules_are_read_from_yaml_like_values():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ParamFreezeAssertion, "check")
    config = parser.parse_args(
        ['--check.frozen=[{"pattern": "backbone.*", "until_step": 100}, "head.bias"]', '--check.exclude=["*lora_*"]']
    )
    check = ParamFreezeAssertion(**vars(config.check))
    assert [r.describe() for r in check.rules] == ["'backbone.*' until step 100", "'head.bias'"]
    with pytest.raises(ValueError, match="gives both 'until_epoch' and 'until_step'"):
        ParamFreezeAssertion(frozen=[{"pattern": "a", "until_epoch": 1, "until_step": 2}])
    with pytest.raises(ValueError, match="unknown key"):
        ParamFreezeAssertion(frozen=[{"pattern": "a", "until": 1}])


# LoRA ------------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A linear layer with a low-rank adapter, named like peft's (``base_layer``, ``lora_A``, ``lora_B``)."""

    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features) * 0.05)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.merged = False

    def forward(self, x):
        out = self.base_layer(x)
        return out if self.merged else out + x @ self.lora_A.T @ self.lora_B.T

    def merge_adapter(self):
        """What peft's ``merge_adapter()`` does: fold the adapter into the base weight."""
        with torch.no_grad():
            self.base_layer.weight += self.lora_B @ self.lora_A
        self.merged = True


class TinyAttention(pl.LightningModule):
    """A one-block attention classifier on digits rows, with LoRA on the query and value projections."""

    def __init__(self, mistake: str = "none"):
        super().__init__()
        self.mistake = mistake
        self.embed = nn.Linear(8, 32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.out = nn.Linear(32, 10)
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        self.q, self.v = LoRALinear(self.q), LoRALinear(self.v)
        if mistake == "base_trainable":
            self.v.base_layer.weight.requires_grad_(True)

    def forward(self, x):
        h = self.embed(x.view(-1, 8, 8))
        attn = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / 32**0.5, dim=-1)
        return self.out(self.norm(h + attn @ self.v(h)).mean(1))

    def training_step(self, batch, batch_idx):  # noqa: ARG002
        if self.mistake == "merge" and self.global_step == 3:
            self.q.merge_adapter()
        if self.mistake == "merge_then_crash" and self.global_step == 3:
            self.q.merge_adapter()
        if self.mistake == "merge_then_crash" and self.global_step == 4:
            raise RuntimeError("shape mismatch in backward after merge_adapter()")
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer):  # noqa: ARG002
        if self.mistake == "weight_decay":
            for parameter in self.parameters():
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)

    def configure_optimizers(self):
        params = (
            self.parameters() if self.mistake == "weight_decay" else [p for p in self.parameters() if p.requires_grad]
        )
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


def lora_check(**kwargs):
    return ParamFreezeAssertion(frozen=["*"], exclude=["*lora_*"], **kwargs)


def test_lora_with_one_exclude_pattern_is_silent_on_a_clean_run(tmp_path):
    model = TinyAttention()
    adapters = model.q.lora_B.detach().clone()
    trainer([lora_check()], tmp_path, max_epochs=2, limit_val_batches=0).fit(model, DigitsDataModule())
    assert flags(tmp_path) == []
    assert not torch.equal(model.q.lora_B, adapters)  # the adapters did train
    frozen, _ = match_patterns(tensor_names(model), ["*"], ["*lora_*"])
    assert "q.base_layer.weight" in frozen and not any("lora_" in name for name in frozen)


def test_lora_base_weight_left_trainable_stops_before_the_first_step(tmp_path):
    model = TinyAttention("base_trainable")
    before = model.v.base_layer.weight.detach().clone()
    with pytest.raises(ParameterChangedError, match="requires_grad=True before the first optimizer step") as info:
        trainer([lora_check()], tmp_path).fit(model, DigitsDataModule())
    assert info.value.event.data["tensors"] == ["v.base_layer.weight"] and info.value.event.global_step == 0
    assert torch.equal(model.v.base_layer.weight, before)


def test_lora_base_weight_left_trainable_and_moving_is_reported_with_warn(tmp_path):
    with quiet():
        trainer([lora_check(on_violation="warn")], tmp_path).fit(TinyAttention("base_trainable"), DigitsDataModule())
    [moved] = events(tmp_path, "param_changed")
    assert moved["data"]["tensors"] == ["v.base_layer.weight"] and moved["global_step"] == 1


def test_adamw_weight_decay_on_frozen_lora_base_weights_with_zero_grads_is_caught(tmp_path):
    with quiet():
        trainer([lora_check(on_violation="warn")], tmp_path).fit(TinyAttention("weight_decay"), DigitsDataModule())
    [held] = events(tmp_path, "frozen_param_in_optimizer")
    assert "q.base_layer.weight" in held["data"]["tensors"] and held["global_step"] == 0
    [moved] = events(tmp_path, "param_changed")
    assert "q.base_layer.weight" in moved["data"]["tensors"] and moved["global_step"] == 1  # after the first step


def test_merge_adapter_mid_training_is_reported(tmp_path):
    with quiet():
        trainer([lora_check(on_violation="warn")], tmp_path).fit(TinyAttention("merge"), DigitsDataModule())
    [moved] = events(tmp_path, "param_changed")
    assert moved["data"]["tensors"] == ["q.base_layer.weight"] and moved["data"]["check"] == "epoch end"


def test_merge_adapter_then_a_crash_is_reported_before_the_crash_propagates(tmp_path):
    with pytest.raises(RuntimeError, match="after merge_adapter"):
        trainer([lora_check()], tmp_path).fit(TinyAttention("merge_then_crash"), DigitsDataModule())
    [moved] = events(tmp_path, "param_changed")
    assert moved["data"]["tensors"] == ["q.base_layer.weight"] and moved["data"]["check"] == "after RuntimeError"


# EMA swaps ---------------------------------------------------------------------------------------------------


class EMASwap(pl.Callback):
    """Swaps averaged weights in on ``on_validation_start`` and back on ``on_validation_end`` (NeMo's hooks)."""

    def __init__(self):
        self.shadow: dict[str, torch.Tensor] = {}

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, p in pl_module.named_parameters():
            avg = self.shadow.setdefault(name, p.detach().clone())
            avg.lerp_(p.detach(), 0.1)

    def _swap(self, pl_module):
        with torch.no_grad():
            for name, p in pl_module.named_parameters():
                if name in self.shadow:
                    tmp = p.detach().clone()
                    p.copy_(self.shadow[name])
                    self.shadow[name] = tmp

    @override
    def on_validation_start(self, trainer, pl_module):
        self._swap(pl_module)

    @override
    def on_validation_end(self, trainer, pl_module):
        self._swap(pl_module)


class MutatesInValidation(DigitsClassifier):
    @override
    def validation_step(self, batch, batch_idx):
        if batch_idx == 1 and not self.trainer.sanity_checking:
            with torch.no_grad():
                self.head.bias.add_(1e-3)
        return super().validation_step(batch, batch_idx)


@pytest.mark.parametrize("order", ["ema_first", "check_first"])
def test_ema_swaps_on_validation_start_and_end_are_silent_in_either_callback_order(tmp_path, order):
    ema, check = EMASwap(), ParamFreezeAssertion()
    callbacks = [ema, check] if order == "ema_first" else [check, ema]
    trainer(callbacks, tmp_path, max_epochs=2).fit(DigitsClassifier(), DigitsDataModule())
    assert flags(tmp_path) == [] and len(ema.shadow) > 0
    rows = {(row.stage, row.check): row for row in check.phase_observations()}
    assert rows[("validate", "parameters fixed")].verdict == "verified"

    bad = tmp_path / "bad"
    ema, check = EMASwap(), ParamFreezeAssertion(on_violation="warn")
    with quiet():
        trainer([ema, check] if order == "ema_first" else [check, ema], bad, max_epochs=1).fit(
            MutatesInValidation(), DigitsDataModule()
        )
    [moved] = events(bad, "param_changed")
    assert moved["data"]["tensors"] == ["head.bias"] and moved["stage"] == "validate"


# Stop before damage, resume -------------------------------------------------------------------------------


class ForgotToFreeze(DigitsClassifier):
    """Declared frozen, but requires_grad stays True (and so it is in the optimizer)."""

    @override
    def on_train_epoch_start(self):
        self.backbone.eval()


def test_raise_stops_before_the_first_step_for_a_trainable_frozen_parameter(tmp_path):
    model = ForgotToFreeze()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit = trainer([ParamFreezeAssertion(frozen=["backbone.*"])], tmp_path)
    with pytest.raises(ParameterChangedError, match="requires_grad=True") as info:
        fit.fit(model, DigitsDataModule())
    assert fit.global_step == 0 and info.value.event.kind == "frozen_param_trainable"
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # no update at all
    assert [e["kind"] for e in events(tmp_path)] == ["frozen_param_trainable", "frozen_param_in_optimizer"]
    # the clean counterpart: frozen the right way, nothing is said
    clean = tmp_path / "clean"
    trainer([ParamFreezeAssertion(frozen=["backbone.*"])], clean).fit(
        DigitsClassifier(freeze_backbone=True), DigitsDataModule()
    )
    assert flags(clean) == []


class FrozenInTrainMode(DigitsClassifier):
    """Frozen backbone whose BatchNorm is left in train mode (running statistics keep changing)."""

    def __init__(self):
        super().__init__(freeze_backbone=True)

    @override
    def on_train_epoch_start(self):
        pass


def test_frozen_batchnorm_in_train_mode_is_caught_again_after_a_mid_epoch_resume(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    with quiet():
        trainer(
            [ParamFreezeAssertion(frozen=["backbone.*"], on_violation="warn"), saver],
            tmp_path,
            enable_checkpointing=True,
            limit_val_batches=0,
        ).fit(FrozenInTrainMode(), DigitsDataModule())
    assert len(events(tmp_path, "frozen_batchnorm_training")) == 1
    [ckpt] = sorted((tmp_path / "ckpt").glob("*step=3*.ckpt"))
    resumed = tmp_path / "resumed"
    check = ParamFreezeAssertion(frozen=["backbone.*"])
    with pytest.raises(ParameterChangedError, match="BatchNorm") as info:
        trainer([check], resumed, limit_val_batches=0).fit(FrozenInTrainMode(), DigitsDataModule(), ckpt_path=ckpt)
    assert info.value.event.global_step == 3  # before the first step after the resume


# Tied, sparse and unverifiable tensors ------------------------------------------------------------------------


class Tied(DigitsClassifier):
    """The head (frozen) is also reachable as ``decoder.weight`` (a tied weight); a sparse buffer rides along."""

    def __init__(self, mutate=False):
        super().__init__()
        self.head.requires_grad_(False)
        self.decoder = nn.Module()
        self.decoder.weight = self.head.weight
        self.register_buffer("sparse_counts", torch.zeros(4, 10).to_sparse())
        self.mutate = mutate

    @override
    def training_step(self, batch, batch_idx):
        if self.mutate == "tied" and self.global_step == 2:
            with torch.no_grad():
                self.decoder.weight[0, 0] += 1e-3
        if self.mutate == "sparse" and self.global_step == 2:
            self.sparse_counts = (self.sparse_counts + torch.eye(4, 10).to_sparse()).coalesce()
        return super().training_step(batch, batch_idx)


def test_a_tied_weight_is_checked_by_its_second_name():
    model = Tied()
    assert tensor_names(model)["decoder.weight"] == "head.weight"
    assert match_patterns(tensor_names(model), ["decoder.*"]) == (["head.weight"], [])


@pytest.mark.parametrize("mutate", [False, "tied", "sparse"])
def test_tied_and_sparse_tensors_are_checked_without_crashing(tmp_path, mutate):
    frozen = ["decoder.weight", "sparse_counts"]
    with quiet():
        trainer([ParamFreezeAssertion(frozen=frozen, on_violation="warn")], tmp_path, max_epochs=1).fit(
            Tied(mutate), DigitsDataModule()
        )
    moved = [name for e in events(tmp_path, "param_changed") for name in e["data"]["tensors"]]
    expected = {False: [], "tied": ["head.weight"], "sparse": ["sparse_counts"]}[mutate]
    assert moved == expected
    assert events(tmp_path, "internal_error") == []


def test_a_tensor_that_cannot_be_fingerprinted_is_an_info_event_not_a_crash(tmp_path):
    class Ghost(DigitsClassifier):
        def __init__(self):
            super().__init__()
            self.register_buffer("ghost", torch.randn(3).to_mkldnn(), persistent=False)  # an opaque layout

    trainer([ParamFreezeAssertion()], tmp_path).validate(Ghost(), DigitsDataModule(), verbose=False)
    [info] = events(tmp_path, "tensor_unverifiable")
    assert info["severity"] == "info" and info["data"]["tensors"] == ["ghost"]
    assert flags(tmp_path) == []


def test_a_sparse_baseline_counts_changed_elements():
    module = nn.Module()
    module.register_buffer("s", torch.sparse_coo_tensor([[0, 1], [1, 0]], [1.0, 2.0], (2, 2)))
    baseline = FreezeBaseline(named_tensors(module), snapshot="cpu")
    module.s = torch.sparse_coo_tensor([[0, 1], [1, 0]], [1.0, 2.5], (2, 2))
    [change] = baseline.compare(named_tensors(module))
    assert change.changed_elements == 1 and change.max_abs_diff == 0.5


# What a new user's trial found -------------------------------------------------------------------------------


class WithNeck(DigitsClassifier):
    """A frozen ``neck`` outside the backbone that BackboneFinetuning manages; ``mistake`` unfreezes it."""

    def __init__(self, mistake: str = "none"):
        super().__init__()
        self.neck = nn.BatchNorm1d(64) if mistake == "neck_bn_left_trainable" else nn.Linear(64, 64)
        if mistake != "neck_bn_left_trainable":
            self.neck.requires_grad_(False)
        self.mistake = mistake

    @override
    def forward(self, x):
        return super().forward(self.neck(x))

    @override
    def on_train_epoch_start(self):
        if isinstance(self.neck, nn.Linear):
            self.neck.eval()
        if self.mistake == "unfreeze_neck" and self.current_epoch == 1:
            self.neck.requires_grad_(True)
            self.trainer.optimizers[0].add_param_group({"params": list(self.neck.parameters())})


@pytest.mark.parametrize("mistake", ["unfreeze_neck", "neck_bn_left_trainable"])
def test_following_backbone_finetuning_does_not_excuse_what_it_does_not_manage(tmp_path, mistake):
    callbacks = [BackboneFinetuning(unfreeze_backbone_at_epoch=1), ParamFreezeAssertion(frozen=["backbone", "neck"])]
    model = WithNeck(mistake)
    neck = {n: t.detach().clone() for n, t in model.neck.state_dict().items()}
    with pytest.raises(ParameterChangedError) as info:
        trainer(callbacks, tmp_path, max_epochs=3, limit_val_batches=0).fit(model, DigitsDataModule())
    assert all(name.startswith("neck.") for name in info.value.event.data["tensors"])
    if mistake == "unfreeze_neck":  # stopped at the start of epoch 1, before the neck's first update
        assert info.value.event.epoch == 1 and "a hook between the last step" in info.value.event.data["cause"]
    else:  # the BatchNorm outside the backbone is not one BackboneFinetuning left trainable
        assert info.value.event.global_step == 0
    assert all(torch.equal(neck[n], t) for n, t in model.neck.state_dict().items())
    released = [n for e in events(tmp_path, "frozen_released") for n in e["data"]["tensors"]]
    assert released and all(name.startswith("backbone.") for name in released)
    clean = tmp_path / "clean"
    trainer(callbacks, clean, max_epochs=3, limit_val_batches=0).fit(WithNeck(), DigitsDataModule())
    assert flags(clean) == []


class WritesFrozen(DigitsClassifier):
    """Frozen the right way, but training_step writes into a frozen weight directly, from the first step."""

    def __init__(self):
        super().__init__(freeze_backbone=True)

    @override
    def training_step(self, batch, batch_idx):
        self.backbone[0].bias.data.mul_(0.999)
        return super().training_step(batch, batch_idx)


def test_a_direct_write_is_caught_after_the_first_step_even_when_the_preflight_is_clean(tmp_path):
    with pytest.raises(ParameterChangedError) as info:
        trainer([ParamFreezeAssertion(frozen=["backbone"])], tmp_path, limit_train_batches=20).fit(
            WritesFrozen(), DigitsDataModule()
        )
    assert info.value.event.data["tensors"] == ["backbone.0.bias"] and info.value.event.global_step == 1


def test_frozen_weights_in_the_optimizer_without_gradients_are_an_info_and_a_gradient_stops_the_step(tmp_path):
    class AllInAdamW(TinyAttention):
        def __init__(self, zero_grads: bool):
            super().__init__()
            self.zero_grads = zero_grads

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

        def on_after_backward(self):
            if self.zero_grads and self.global_step == 2:  # e.g. zero_grad(set_to_none=False) somewhere
                self.q.base_layer.weight.grad = torch.zeros_like(self.q.base_layer.weight)

    trainer([lora_check()], tmp_path).fit(AllInAdamW(zero_grads=False), DigitsDataModule())
    assert flags(tmp_path) == []  # optimizers skip parameters whose gradient is None: nothing moves
    [info] = events(tmp_path, "frozen_param_in_optimizer")
    assert info["severity"] == "info" and "q.base_layer.weight" in info["data"]["tensors"]

    graded = tmp_path / "graded"
    model = AllInAdamW(zero_grads=True)
    with pytest.raises(ParameterChangedError, match="have a gradient before optimizer step 2") as caught:
        trainer([lora_check()], graded).fit(model, DigitsDataModule())
    assert caught.value.event.data["tensors"] == ["q.base_layer.weight"]
    assert events(graded, "param_changed") == []  # stopped before the step that would have moved it


def test_a_tied_weight_is_reported_with_the_name_the_user_declared(tmp_path):
    with quiet():
        trainer([ParamFreezeAssertion(frozen=["decoder.weight"], on_violation="warn")], tmp_path).fit(
            Tied("tied"), DigitsDataModule()
        )
    [moved] = events(tmp_path, "param_changed")
    assert "head.weight (= decoder.weight)" in moved["message"]


def test_a_fit_resumed_after_a_followed_unfreeze_stays_silent(tmp_path):
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    callbacks = [BackboneFinetuning(unfreeze_backbone_at_epoch=1), ParamFreezeAssertion(frozen=["backbone"]), saver]
    trainer(callbacks, tmp_path, max_epochs=2, limit_val_batches=0, enable_checkpointing=True).fit(
        DigitsClassifier(), DigitsDataModule()
    )
    [ckpt] = sorted((tmp_path / "ckpt").glob("epoch=1*.ckpt"))
    resumed = tmp_path / "resumed"
    callbacks = [BackboneFinetuning(unfreeze_backbone_at_epoch=1), ParamFreezeAssertion(frozen=["backbone"])]
    trainer(callbacks, resumed, max_epochs=3, limit_val_batches=0).fit(
        DigitsClassifier(), DigitsDataModule(), ckpt_path=ckpt
    )
    assert flags(resumed) == []
