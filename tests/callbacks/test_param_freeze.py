import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import read_jsonl, small_trainer
from lightning.pytorch import callbacks as lightning_callbacks
from torch import nn
from typing_extensions import override

from lightning_phases import ParameterChangedError, ParamFreezeAssertion, PhaseUsageError, PhaseWarning
from lightning_phases.detectors.freeze import FreezeBaseline, match_patterns, named_tensors


class Mutating(DigitsClassifier):
    """The digits model with optional misbehaviour in one stage."""

    def __init__(self, mutate=None, big=False, **kwargs):
        super().__init__(**kwargs)
        self.mutate = mutate
        if big:  # a 2M-element tensor, so a flipped bit hides among many
            self.register_buffer("table", torch.randn(2_000_000))

    def validation_step(self, batch, batch_idx):
        if self.mutate == "train_mode_in_validation":
            self.train()  # BatchNorm then updates its running statistics
        if self.mutate == "optimizer_step_in_validation" and batch_idx == 0 and not self.trainer.sanity_checking:
            optimizer = self.optimizers()
            with torch.enable_grad():
                loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
                self.manual_backward(loss) if not self.automatic_optimization else loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        if self.mutate == "one_ulp_in_test" and batch_idx == 1:
            with torch.no_grad():
                weight = self.head.weight
                weight[3, 7] = torch.nextafter(weight[3, 7], torch.tensor(float("inf"), device=weight.device))
        return super().test_step(batch, batch_idx)

    def predict_step(self, batch, batch_idx):
        if self.mutate == "bit_flip_in_predict" and batch_idx == 0:
            self.table.view(torch.int32)[1_234_567] ^= 1
        return super().predict_step(batch, batch_idx)


def trainer(callbacks, tmp_path, **kwargs):
    return small_trainer(callbacks, default_root_dir=tmp_path, **kwargs)


def events(tmp_path, kind=None):
    lines = read_jsonl(tmp_path / "phase_events.jsonl") if (tmp_path / "phase_events.jsonl").exists() else []
    return [e for e in lines if kind is None or e["kind"] == kind]


def test_clean_fit_validate_test_predict_with_dropout_and_batchnorm_is_silent(tmp_path):
    check = ParamFreezeAssertion(check_every_n_batches=1)
    t = trainer([check], tmp_path)
    model, data = Mutating(), DigitsDataModule()
    t.fit(model, data)
    t.validate(model, data, verbose=False)
    t.test(model, data, verbose=False)
    t.predict(model, data)
    assert check.events == [] and events(tmp_path) == []
    report = json.loads((tmp_path / "phase_report.json").read_text())
    observed = {row["stage"]: row["observations"] for row in report["stages"]}
    for stage in ("sanity_check", "validate", "test", "predict"):
        fixed = next(o for o in observed[stage] if o["check"] == "parameters fixed")
        assert fixed["verdict"] == "verified" and fixed["detail"].endswith(", 0 changes")
    assert "train" not in {o["stage"] for row in report["stages"] for o in row["observations"]}


def test_train_mode_in_validation_is_caught_naming_the_batchnorm_buffers(tmp_path):
    check = ParamFreezeAssertion(on_violation="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer([check], tmp_path, num_sanity_val_steps=0).validate(
            Mutating("train_mode_in_validation"), DigitsDataModule(), verbose=False
        )
    [event] = events(tmp_path, "param_changed")
    assert event["stage"] == "validate" and event["severity"] == "warning"
    assert event["data"]["tensors"] == [
        "backbone.1.running_mean",
        "backbone.1.running_var",
        "backbone.1.num_batches_tracked",
    ]
    assert event["data"]["stage"] == "validate"


def test_one_ulp_change_in_test_step_raises_after_the_event_is_on_disk(tmp_path):
    check = ParamFreezeAssertion()
    with pytest.raises(
        ParameterChangedError, match=r"1 tensor\(s\) changed during test \(after the last batch\): head.weight"
    ) as info:
        trainer([check], tmp_path).test(Mutating("one_ulp_in_test"), DigitsDataModule(), verbose=False)
    [event] = events(tmp_path, "param_changed")
    assert event["data"]["tensors"] == ["head.weight"] and event["data"]["check"] == "after the last batch"
    assert info.value.event.to_dict() == event
    assert json.loads((tmp_path / "phase_report.json").read_text())["stages"][0]["events"] == {"param_changed": 1}


def test_flipped_lowest_bit_in_a_large_tensor_in_predict_is_critical(tmp_path):
    check = ParamFreezeAssertion(on_violation="warn", snapshot="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer([check], tmp_path).predict(Mutating("bit_flip_in_predict", big=True), DigitsDataModule())
    [event] = events(tmp_path, "param_changed")
    assert event["stage"] == "predict" and event["severity"] == "critical"  # predict: failures are costly
    assert event["data"]["tensors"] == ["table"]
    [change] = event["data"]["changes"]
    assert change["changed_elements"] == 1 and 0 < change["max_abs_diff"] < 1e-6


def test_optimizer_step_inside_validation_is_caught(tmp_path):
    check = ParamFreezeAssertion()
    with pytest.raises(ParameterChangedError):
        trainer([check], tmp_path, num_sanity_val_steps=0).fit(
            Mutating("optimizer_step_in_validation"), DigitsDataModule()
        )
    [event] = events(tmp_path, "param_changed")
    assert event["stage"] == "validate"
    assert {"head.weight", "head.bias", "backbone.0.weight"} <= set(event["data"]["tensors"])


def test_restore_puts_the_weights_back(tmp_path):
    check = ParamFreezeAssertion(on_violation="warn", snapshot="device", restore=True)
    model = Mutating("one_ulp_in_test")
    before = model.head.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer([check], tmp_path).test(model, DigitsDataModule(), verbose=False)
    [event] = events(tmp_path, "param_changed")
    assert event["data"]["restored"] == ["head.weight"]
    assert torch.equal(model.head.weight.detach().view(torch.int32), before.view(torch.int32))


class LeakyFrozen(DigitsClassifier):
    """Backbone frozen with requires_grad=False but left in AdamW, with zero (not None) grads."""

    def __init__(self):
        super().__init__(freeze_backbone=True, weight_decay=0.1)

    @override
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)

    @override
    def on_before_optimizer_step(self, optimizer):
        for param in self.backbone.parameters():
            param.grad = torch.zeros_like(param)  # e.g. zero_grad(set_to_none=False) after an earlier unfreeze


def test_frozen_params_in_adamw_with_zero_grads_are_caught_moving(tmp_path):
    check = ParamFreezeAssertion(frozen=["backbone.*"], on_violation="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer([check], tmp_path, limit_val_batches=0).fit(LeakyFrozen(), DigitsDataModule())
    [held] = events(tmp_path, "frozen_param_in_optimizer")
    assert held["data"]["tensors"] == ["backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias"]
    assert held["data"]["where"]["backbone.0.weight"] == ["optimizer 0 group 0"]
    assert events(tmp_path, "frozen_param_trainable") == []
    moved = events(tmp_path, "param_changed")
    assert len(moved) == 1  # reported once, then followed
    assert moved[0]["stage"] == "train" and moved[0]["data"]["frozen"] is True
    # decoupled weight decay shrinks every non-zero frozen tensor; BatchNorm's bias starts at 0 and stays there
    assert set(moved[0]["data"]["tensors"]) == {"backbone.0.weight", "backbone.0.bias", "backbone.1.weight"}


def test_properly_frozen_backbone_is_silent_and_trainable_frozen_params_are_reported(tmp_path):
    check = ParamFreezeAssertion(frozen=["backbone"], check_every_n_batches=2)
    trainer([check], tmp_path / "good").fit(DigitsClassifier(freeze_backbone=True), DigitsDataModule())
    assert check.events == []
    unfrozen = ParamFreezeAssertion(frozen=["backbone.*"], on_violation="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer([unfrozen], tmp_path / "bad").fit(DigitsClassifier(), DigitsDataModule())
    kinds = [e.kind for e in unfrozen.events]
    assert kinds[:3] == ["frozen_param_trainable", "frozen_param_in_optimizer", "frozen_batchnorm_training"]
    assert "param_changed" in kinds  # and they really moved
    assert unfrozen.events[2].data["modules"] == ["backbone.1"]


class SwapProbe(pl.Callback):
    """Records whether the weights used in a validation batch differ from the live weights after it."""

    def __init__(self):
        self.swapped = []

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self._during = pl_module.head.weight.detach().clone()

    @override
    def on_validation_end(self, trainer, pl_module):
        self.swapped.append(not torch.equal(self._during, pl_module.head.weight.detach()))


@pytest.mark.skipif(
    not hasattr(lightning_callbacks, "WeightAveraging"), reason="WeightAveraging came with Lightning 2.6"
)
def test_weight_averaging_swap_around_validation_is_not_a_violation(tmp_path):
    check, probe = ParamFreezeAssertion(check_every_n_batches=1), SwapProbe()
    t = trainer([lightning_callbacks.WeightAveraging(), check, probe], tmp_path, max_epochs=2, limit_val_batches=4)
    t.fit(DigitsClassifier(), DigitsDataModule())
    assert any(probe.swapped)  # the averaged weights really were swapped in for validation
    assert check.events == []
    ran = {(stage, what) for (stage, what), tally in check._tally.items() if tally.checks}
    assert ("validate", "fixed") in ran


def test_tied_weights_are_reported_once(tmp_path):
    class Tied(Mutating):
        def __init__(self):
            super().__init__("one_ulp_in_test")
            self.tied_head = self.head  # the same module under two names

    check = ParamFreezeAssertion(on_violation="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer([check], tmp_path).test(Tied(), DigitsDataModule(), verbose=False)
    [event] = events(tmp_path, "param_changed")
    assert event["data"]["tensors"] == ["head.weight"]


def test_a_pattern_matching_nothing_is_a_usage_error_at_setup_with_a_suggestion(tmp_path):
    """A typo in ``frozen`` would silently check nothing: it stops the call at setup, before any step."""
    model = DigitsClassifier()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(PhaseUsageError, match=r"'backbon\.\*' match no parameter.*did you mean 'backbone'"):
        trainer([ParamFreezeAssertion(frozen=["backbon.*", "head.*"])], tmp_path).fit(model, DigitsDataModule())
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())  # nothing trained
    with pytest.raises(PhaseUsageError, match=r"'\*lora_\*' match no parameter"):
        trainer([ParamFreezeAssertion(frozen=["*"], exclude=["*lora_*"])], tmp_path).validate(
            DigitsClassifier(), DigitsDataModule(), verbose=False
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"stages": ["tets"]}, ValueError, "stages=['tets']: 'tets' is not allowed"),
        ({"on_violation": "stop"}, ValueError, "on_violation='stop' is not allowed; choose one of 'warn', 'raise'"),
        ({"snapshot": "gpu"}, ValueError, "snapshot='gpu' is not allowed"),
        ({"restore": True}, ValueError, "restore=True needs a copy"),
        ({"check_every_n_batches": -1}, ValueError, "check_every_n_batches=-1 must be an integer >= 0"),
        ({"frozen": "backbone.*"}, TypeError, "frozen='backbone.*' must be a list"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, needle):
    with pytest.raises(error) as info:
        ParamFreezeAssertion(**kwargs)
    assert needle in str(info.value)


def test_detector_handles_meta_zero_size_and_half_precision_buffers():
    module = nn.Module()
    module.register_buffer("fp16", torch.randn(7, dtype=torch.float16))
    module.register_buffer("bf", torch.randn(3, dtype=torch.bfloat16))
    module.register_buffer("empty", torch.empty(0))
    module.register_buffer("ghost", torch.empty(5, device="meta"))
    module.register_buffer("steps", torch.tensor(3))
    baseline = FreezeBaseline(named_tensors(module), snapshot="cpu")
    assert baseline.unverifiable == ["ghost"]
    module.fp16.view(torch.int16)[6] ^= 1
    module.steps += 1
    changes = baseline.compare(named_tensors(module))
    assert [(c.name, c.changed_elements) for c in changes] == [("fp16", 1), ("steps", 1)]
    assert match_patterns(["a.b", "ab.c", "a"], ["a"]) == (["a.b", "a"], [])


def test_a_frozen_tensor_moving_every_epoch_is_one_event_and_every_movement_is_counted(tmp_path):
    check = ParamFreezeAssertion(frozen=["backbone.*"], on_violation="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer([check], tmp_path, limit_val_batches=0, max_epochs=3).fit(LeakyFrozen(), DigitsDataModule())
    moved = events(tmp_path, "param_changed")
    # caught after the first optimizer step, then not once per epoch
    assert len(moved) == 1 and moved[0]["data"]["check"] == "batch 0" and moved[0]["global_step"] == 1
    [row] = [row for row in check.phase_observations() if row.check == "frozen parameters fixed"]
    # checks after the first step and at 3 epoch ends; the 3 decayed tensors move between any two of them
    assert row.verdict == "violated" and "4 checks, 12 changes" in row.detail
