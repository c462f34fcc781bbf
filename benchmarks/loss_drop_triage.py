"""LossDropSentinel's triage on real Trainer runs, several seeds: does it name the kind of drop right?

    python benchmarks/loss_drop_triage.py            # seeds 0 1 2
    python benchmarks/loss_drop_triage.py --seeds 3 4

Cases (each a real Trainer run at the sentinel's defaults, with a validation DataLoader):

* ``leak, training data only``: the digits MLP, the label written into blank pixels of the training batches
  from step 400 (expected ``train_only``);
* ``leak, also in validation``: the same leak reaching the validation batches too (expected ``generalizes``:
  on the data it can see, the model did get better);
* ``phase change``: a 2-layer attention-only transformer forming induction heads on repeated random tokens,
  held-out sequences of other tokens (expected ``generalizes``);
* ``leak + LR cut``: the training-only leak with the learning rate halved 2 steps before it (expected
  ``train_only``: the cut coincides, but the held-out loss rose, which it does not explain);
* ``overfitting, then a jump``: a wide MLP memorising 160 digits with 30% random labels (its training loss
  falls, its held-out loss rises), the label leaking into training and validation inputs from step 1000
  (expected ``generalizes``), and ``overfitting, then a leak``: into the training inputs only (expected
  ``train_only``); ``overfitting, then a jump, far reference``: the jump with ``triage_every_n_steps=1000``
  (the last reference 360 steps before it).

Prints one row per case and seed (the triage of every drop flagged after the case's event, with ``followed``),
the share named right, and the time the held-out evaluations took against the run's.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "tests"), str(ROOT / "tests" / "callbacks")]

from digits import DigitsDataModule  # noqa: E402
from induction import InductionModel, repeated_tokens  # noqa: E402
from test_loss_drop import Scripted  # noqa: E402
from test_loss_drop_triage import OverfittingDictMLP, overfitting_loaders  # noqa: E402

from lightning_phases import LossDropSentinel  # noqa: E402

CASES: dict[str, tuple[str, int]] = {  # case: (expected triage, step of the event)
    "leak, training data only": ("train_only", 400),
    "leak, also in validation": ("generalizes", 400),
    "phase change": ("generalizes", 0),
    "leak + LR cut": ("train_only", 400),
    "overfitting, then a jump": ("generalizes", 1000),
    "overfitting, then a leak": ("train_only", 1000),
    "overfitting, then a jump, far reference": ("generalizes", 1000),
}


def run_case(case: str, seed: int, root: Path) -> tuple[LossDropSentinel, float]:
    pl.seed_everything(seed)
    sentinel = LossDropSentinel(triage_every_n_steps=1000 if case.endswith("far reference") else 200)
    options: dict[str, Any] = dict(
        max_epochs=-1,
        limit_train_batches=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root / f"{case.replace(' ', '_').replace(',', '')}-{seed}",
        callbacks=[sentinel],
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case == "phase change":
            trainer = pl.Trainer(max_steps=1400, limit_val_batches=2, check_val_every_n_epoch=1000, **options)
            trainer.fit(
                InductionModel(), repeated_tokens(32 * 1400, seed=100 + seed), repeated_tokens(128, seed=200 + seed)
            )
        elif case.startswith("overfitting"):
            trainer = pl.Trainer(max_steps=1100, limit_val_batches=3, check_val_every_n_epoch=1000, **options)
            trainer.fit(OverfittingDictMLP(1000, "jump" in case), *overfitting_loaders(seed))
        else:
            model = Scripted(
                leak_label_from_step=400,
                leak_in_validation=case == "leak, also in validation",
                lr_factor_at=(398, 0.5) if case == "leak + LR cut" else None,
            )
            trainer = pl.Trainer(max_steps=560, limit_val_batches=3, check_val_every_n_epoch=3, **options)
            trainer.fit(model, DigitsDataModule(label_noise=0.2, seed=seed))
    return sentinel, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path("runs/bench_triage")
    print(f"# LossDropSentinel triage, torch {torch.__version__}, 1 CPU thread, seeds {args.seeds}")
    print("| case | seed | expected | triage of the case's drop (followed) | other drops | held-out s / run s |")
    print("|---|---|---|---|---|---|")
    right = total = 0
    for case, (expected, event_step) in CASES.items():
        for seed in args.seeds:
            sentinel, seconds = run_case(case, seed, root)
            drops = [e for e in sentinel.events if e.kind == "loss_drop"]
            case_drops = [e for e in drops if e.global_step >= event_step]
            others = [f"{e.data['triage']} at {e.global_step}" for e in drops if e.global_step < event_step]
            found = case_drops[0] if case_drops else None
            if found is None:
                said = "not flagged"
            else:
                followed = found.data["triage_detail"].get("followed")
                said = found.data["triage"] + (f" ({followed:.2f})" if followed is not None else "")
            total += 1
            right += found is not None and found.data["triage"] == expected
            share = f"{sentinel.probe.seconds:.2f} / {seconds:.1f}"
            print(f"| {case} | {seed} | {expected} | {said} | {', '.join(others) or '-'} | {share} |")
    print(f"\nnamed right: {right}/{total}")


if __name__ == "__main__":
    main()
