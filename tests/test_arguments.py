"""Every constructor argument of every public callback refuses bad input at construction, clearly.

The table below has one entry per parameter of each public class; the parameters are discovered with
``inspect.signature``, so a new argument without an entry fails :func:`test_every_parameter_has_an_entry`.
Each bad value must raise ``TypeError`` or ``ValueError`` from the constructor, with a message that names the
argument and shows the bad value (its ``repr``). ``nan`` is tried for every parameter, ``inf`` for the numeric
ones.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lightning_phases import LossDropSentinel, ParamFreezeAssertion, Phases, SandboxCheck, ShiftTracker

NAN = float("nan")
INF = float("inf")


@dataclass(frozen=True)
class Part:
    """A bad nested value whose message shows the bad part of it (e.g. one key of a mapping), not all of it.

    Args:
        value: The bad value.
        shown: What the message must show.
    """

    value: Any
    shown: str


@dataclass(frozen=True)
class Bad:
    """The bad values of one parameter.

    Args:
        wrong_type: A value of a wrong type.
        values: More bad values (wrong types or bad values of the right type).
        numeric: Whether the parameter is a number, so ``inf`` and ``-inf`` are tried too.
    """

    wrong_type: Any
    values: tuple[Any, ...] = field(default=())
    numeric: bool = False

    def cases(self) -> list[tuple[Any, str]]:
        """Each bad value with what its message must show: its ``repr``, or for a :class:`Part` the bad part."""
        extra = [INF, -INF] if self.numeric else []
        values = [self.wrong_type, *self.values, NAN, *extra]
        return [(v.value, v.shown) if isinstance(v, Part) else (v, repr(v)) for v in values]


def _features(batch: Any, _outputs: Any) -> Any:
    return batch


# Shared by every PhaseCallback subclass that takes them.
STAGES = Bad({"train": True}, ("train", b"train", ["trian"], ["train", "train"], 5))
NAME = Bad(5, ("a/b", "", "has space", ["x"]))


BAD: dict[type, dict[str, Bad]] = {
    LossDropSentinel: {
        "monitor": Bad(5, ("", ["loss"])),
        "direction": Bad(1, ("down", ["drop"])),
        "on_violation": Bad(True, ("stop", "block", "Warn")),
        "strict": Bad("no", (1, 0, None)),
        "threshold": Bad("7", (0, -1.0, True, None), numeric=True),
        "min_change": Bad("0.2", (0, 1, 1.5, -0.1, False), numeric=True),
        "window": Bad("50", (0, -3, 2, 3.0, 50.5, True), numeric=True),
        "persistence": Bad("8", (0, 2.0, True), numeric=True),
        "floor": Bad("0", (float("nan"), float("inf"), True), numeric=True),
        "check_every_n_steps": Bad("10", (0, -1, 2.5, True, None), numeric=True),
        "cooldown": Bad("50", (-1, 1.5, True, None), numeric=True),
        "ignore_explained": Bad("no", (0, None)),
        "triage_batches": Bad("4", (-1, 1.5, True, None), numeric=True),
        "triage_every_n_steps": Bad("200", (0, -1, 2.5, True, None), numeric=True),
        "triage_metric": Bad(5, ("", ["val_loss"], "val_acc", "val/f1")),  # a score, not a loss
        "checkpoint_dir": Bad(5, ("", b"dir", True, ["dir"])),
        "name": NAME,
    },
    ParamFreezeAssertion: {
        "stages": STAGES,
        "frozen": Bad(
            None,
            (
                "backbone.*",
                b"backbone.*",
                {"backbone.*": 1},
                [5],
                [""],
                5,
                Part([{"pattern": "a", "until_epoch": -1}], "until_epoch=-1"),
                Part([{"pattern": "a", "until_step": 1.5}], "until_step=1.5"),
                Part([{"pattern": "a", "until": 1}], "'until'"),
                Part([{"until_epoch": 1}], "{'until_epoch': 1}"),
                Part([{"pattern": "a", "until_epoch": 1, "until_step": 2}], "both 'until_epoch' and 'until_step'"),
            ),
        ),
        "exclude": Bad({"*lora_*": 1}, ("*lora_*", 5, None, [""], [5])),
        "follow_finetuning": Bad("yes", (1, None)),
        "include_buffers": Bad("no", (1, None)),
        "on_violation": Bad(1, ("block", "stop", None)),
        "check_every_n_batches": Bad("0", (-1, 1.5, True, None), numeric=True),
        "snapshot": Bad(1, ("gpu", None, True)),
        "restore": Bad("no", (1,)),
        "check_replicas": Bad("yes", (0, None)),
        "name": NAME,
    },
    SandboxCheck: {
        "stages": STAGES,
        "on_violation": Bad(1, ("stop", "checkpoint", None)),
        "allow_hosts": Bad(
            {"example.com": 443},
            (
                "example.com",
                5,
                None,
                Part(["https://example.com"], "'https://example.com' is a URL"),
                Part(["example.com:99999"], "'example.com:99999' has an invalid port"),
                Part(["example.com/api"], "'example.com/api' is not a valid host name"),
            ),
        ),
        "allow_write_dirs": Bad({"/tmp": True}, ("/tmp", 5, None, b"/tmp")),
        "allow_subprocess": Bad({"git": True}, ("git", 5, None, b"git")),
        "allow_temp": Bad("yes", (1, None)),
        "enforce": Bad(1, ("landlock", None, "Kernel")),
        "name": NAME,
    },
    ShiftTracker: {
        "features": Bad(5, ("", None, ["input"])),
        "reference_stage": Bad(Part(5, "reference_stage=5"), (Part("trian", "did you mean 'train'"), ["train"], "")),
        "reference_size": Bad("1000", (1, 0, 100.0, True, None), numeric=True),
        "stages": STAGES,
        "alpha": Bad(True, ("0.05", 0, 1, -0.1, 1.5, None), numeric=True),
        "tests": Bad({"mmd": 1}, ("mmd", b"mmd", ["t-test"], [], ["mmd", "mmd"])),
        "n_permutations": Bad("1000", (0, -1, 10.0, True, None), numeric=True),
        "current_size": Bad("10", (0, 10.0, True), numeric=True),
        "window_size": Bad("10", (0, 10.0, True), numeric=True),
        "reduce": Bad(1, ("PCA", "none", True)),
        "reduce_dim": Bad("32", (0, 2.0, True, None), numeric=True),
        "output_softmax": Bad("no", (1, None)),
        "track_rates": Bad("no", (0, None)),
        "anytime_valid": Bad("yes", (1, None)),
        "seed": Bad("abc", (-1, 2**63, 1.0, True, None), numeric=True),
        "checkpoint_mb": Bad("8", (-1, True, None), numeric=True),
        "on_violation": Bad(1, ("block", "checkpoint", None)),
        "name": NAME,
    },
    Phases: {
        "overrides": Bad(
            [("predict", {"parameters": "updated"})],
            (
                "predict",
                Part({"prdict": {}}, "'prdict'"),
                Part({"predict": "updated"}, "['predict']='updated'"),
                Part({"predict": {"params": "updated"}}, "'params'"),
                Part({"predict": {"parameters": "frozen"}}, "'frozen'"),
                Part({"predict": {"sandboxed": "no"}}, "'no'"),
                Part({"predict": {"failure_cost": 1}}, "failure_cost=1"),
                Part({"predict": {"data": NAN}}, "data=nan"),
                Part({5: {}}, "5"),
            ),
        )
    },
}

CLASSES = list(BAD)


def _cases() -> list[Any]:
    cases = []
    for cls, table in BAD.items():
        for argument, bad in table.items():
            for value, shown in bad.cases():
                cases.append(pytest.param(cls, argument, value, shown, id=f"{cls.__name__}-{argument}={value!r}"))
    return cases


# The cases found in code review; each must also be in the table.
REVIEW_CASES = [
    (ParamFreezeAssertion, "include_buffers", "no"),
    (LossDropSentinel, "threshold", NAN),
    (LossDropSentinel, "threshold", INF),
    (ShiftTracker, "seed", "abc"),
    (LossDropSentinel, "checkpoint_dir", 5),
    (ParamFreezeAssertion, "frozen", None),
    (SandboxCheck, "name", "a/b"),
    (LossDropSentinel, "name", "a/b"),
    (SandboxCheck, "allow_temp", "yes"),
    (ShiftTracker, "alpha", True),
    (SandboxCheck, "allow_hosts", ["https://example.com"]),
]


def _same(a: Any, b: Any) -> bool:
    """Equal, with ``nan`` equal to itself and ``True`` unequal to ``1``."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_parameter_has_an_entry(cls):
    parameters = [
        name
        for name, p in inspect.signature(cls).parameters.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    assert parameters, f"{cls.__name__} has no parameters?"
    missing = [p for p in parameters if p not in BAD[cls]]
    stale = [p for p in BAD[cls] if p not in parameters]
    assert not missing, f"{cls.__name__}: add bad values for {missing} to BAD in {__file__}"
    assert not stale, f"{cls.__name__}: {stale} are no longer parameters; remove them from BAD"
    for name, p in inspect.signature(cls).parameters.items():
        assert p.kind is not inspect.Parameter.VAR_KEYWORD, f"{cls.__name__}(**{name}) would hide unchecked arguments"


def test_review_cases_are_in_the_table():
    for cls, argument, value in REVIEW_CASES:
        assert any(_same(value, case) for case, _ in BAD[cls][argument].cases()), (cls.__name__, argument, value)


@pytest.mark.parametrize(("cls", "argument", "value", "shown"), _cases())
def test_bad_value_is_refused_at_construction(cls, argument, value, shown):
    with pytest.raises((TypeError, ValueError)) as info:
        cls(**{argument: value})
    message = str(info.value)
    assert argument in message, f"the message does not name {argument!r}: {message}"
    assert shown in message, f"the message does not show {shown}: {message}"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_defaults_construct(cls):
    cls()
    defaults = {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    cls(**defaults)


def test_valid_non_default_values_construct(tmp_path):
    sentinel = LossDropSentinel(
        monitor="val_loss",
        direction="both",
        on_violation="suspend",
        strict=False,
        threshold=5,
        min_change=0.5,
        window=20,
        persistence=3,
        floor=-1.0,
        check_every_n_steps=1,
        cooldown=0,
        ignore_explained=True,
        checkpoint_dir=tmp_path,
        name="val-loss_1.0",
    )
    assert sentinel.checkpoint_dir == str(tmp_path)
    assert sentinel.detector_options == {
        "threshold": 5,
        "min_change": 0.5,
        "window": 20,
        "persistence": 3,
        "floor": -1.0,
    }
    assert sentinel.name == "val-loss_1.0"

    freeze = ParamFreezeAssertion(
        stages=["validate", "test"],
        frozen=["backbone.*", "head.bias"],
        include_buffers=False,
        on_violation="warn",
        check_every_n_batches=5,
        snapshot="cpu",
        restore=True,
        check_replicas=False,
    )
    assert freeze.frozen == ("backbone.*", "head.bias")
    assert freeze.requested_stages == ("validate", "test")
    ParamFreezeAssertion(frozen=("encoder",), snapshot="device")

    (tmp_path / "relative").mkdir()
    sandbox = SandboxCheck(
        stages=[],
        on_violation="raise",
        allow_hosts=["127.0.0.1:8080", "*.example.com", "10.0.0.0/8", "[::1]:80"],
        allow_write_dirs=[tmp_path, "relative"],
        allow_subprocess=["git", "/usr/bin/env"],
        allow_temp=True,
        enforce="kernel",
        name="outer",
    )
    assert sandbox.allow_write_dirs == (str(tmp_path.resolve()), str((tmp_path / "relative").resolve()))
    assert sandbox.allow_subprocess == ("git", "/usr/bin/env")

    tracker = ShiftTracker(
        features="output",
        reference_stage="validate",
        reference_size=2,
        stages=["test", "predict"],
        alpha=0.01,
        tests=["ks"],
        n_permutations=10,
        current_size=5,
        window_size=100,
        reduce="pca",
        reduce_dim=2,
        output_softmax=False,
        track_rates=False,
        anytime_valid=False,
        seed=2**63 - 1,
        checkpoint_mb=0,
        on_violation="stop",
    )
    assert tracker.tests == ("ks",)
    assert tracker.reference_stage == "validate"
    assert ShiftTracker(features="output").tests == ("mmdagg", "ks")
    assert ShiftTracker(features=_features, reduce="random").features is _features
    assert ShiftTracker(features="backbone.layer4", alpha=0.5).alpha == 0.5

    phases = Phases(overrides={"predict": {"parameters": "updated", "failure_cost": "low"}, "test": {"data": "live"}})
    assert phases.phase_declaration["predict"] == {"parameters": "updated", "failure_cost": "low"}
    assert Phases(overrides={}).phase_declaration == {}
    assert Phases(overrides=None).phase_declaration == {}


def test_paths_are_checked_at_construction():
    # a relative allow_write_dirs entry must exist when the callback is made, not when the stage runs
    with pytest.raises(ValueError, match="'missing' does not exist"):
        SandboxCheck(allow_write_dirs=["missing"])
    assert LossDropSentinel(checkpoint_dir=Path("ckpts")).checkpoint_dir == "ckpts"
