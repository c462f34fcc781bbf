"""Every Lightning hook and every ``PhaseCallback`` method a callback overrides is marked ``@override``.

``typing_extensions.override`` sets ``__override__ = True`` on the function, so a hook whose name drifts from
Lightning's (``on_validation_batch_ends``) or from the base class's is caught here, and type checkers catch it
too. The methods are found by walking each class body, so a new hook cannot be forgotten.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_phases import LossDropSentinel, ParamFreezeAssertion, PhaseCallback, Phases, SandboxCheck, ShiftTracker

CLASSES = [PhaseCallback, LossDropSentinel, ParamFreezeAssertion, SandboxCheck, ShiftTracker, Phases]


def _function(member: Any) -> Any:
    """The function behind a class-body member (a property's getter), or ``None`` for data attributes."""
    if isinstance(member, property):
        return member.fget
    if isinstance(member, (staticmethod, classmethod)):
        return member.__func__
    return member if inspect.isfunction(member) else None


def _methods(cls: type) -> dict[str, Any]:
    """The non-dunder methods and properties defined in ``cls``'s own body (not a base class's own function
    installed on it, as PhaseCallback installs Lightning's no-op batch-start hooks on a subclass that needs none)."""
    return {
        name: function
        for name, member in vars(cls).items()
        if not (name.startswith("__") and name.endswith("__"))
        and (function := _function(member)) is not None
        and not any(vars(base).get(name) is member for base in cls.__mro__[1:])
    }


def _overridden_bases(cls: type, name: str) -> list[type]:
    """The base classes of ``cls`` (up to and including Lightning's ``Callback``) that define ``name``."""
    return [base for base in cls.__mro__[1:] if base is not object and name in vars(base)]


def test_a_callback_that_does_nothing_before_a_batch_is_not_called_there():
    """Its batch-start hooks are Lightning's no-ops; a subclass that acts before a batch gets the dispatch back."""
    for cls in (LossDropSentinel, SandboxCheck, ShiftTracker):
        assert cls.on_train_batch_start is Callback.on_train_batch_start
        assert cls.on_predict_batch_start is Callback.on_predict_batch_start
    assert ParamFreezeAssertion.on_train_batch_start is PhaseCallback.on_train_batch_start

    class Acting(LossDropSentinel):
        @override
        def on_batch_start(self, trainer, pl_module, stage, batch, batch_idx):
            self.seen.append((stage, batch_idx))

    assert Acting.on_train_batch_start is PhaseCallback.on_train_batch_start
    assert Acting.on_test_batch_start is PhaseCallback.on_test_batch_start


def test_the_walk_sees_the_hooks():
    assert {"setup", "teardown", "on_train_batch_end", "state_key", "on_exception"} <= set(_methods(PhaseCallback))
    assert {"declared_stages", "describe", "on_batch_end"} <= set(_methods(LossDropSentinel))
    assert {"state_dict", "load_state_dict"} <= set(_methods(ShiftTracker))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_overriding_methods_are_marked_override(cls):
    required = {
        name
        for name in _methods(cls)
        if hasattr(Callback, name)
        or (cls is not PhaseCallback and issubclass(cls, PhaseCallback) and name in vars(PhaseCallback))
    }
    unmarked = sorted(name for name in required if not getattr(_methods(cls)[name], "__override__", False))
    assert not unmarked, f"{cls.__name__}: mark {unmarked} with @override (from typing_extensions import override)"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_override_marks_only_real_overrides(cls):
    stale = sorted(
        name
        for name, function in _methods(cls).items()
        if getattr(function, "__override__", False) and not _overridden_bases(cls, name)
    )
    assert not stale, f"{cls.__name__}: {stale} are marked @override but override nothing in a base class"
