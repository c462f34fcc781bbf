"""ShiftTracker's module and output features on models that are not a flat MLP: a CNN on images, a transformer on
dict batches of token ids, and a model whose forward takes several tensors and a keyword argument."""

# ruff: noqa: ARG002  (Lightning's step signatures)
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import read_jsonl, small_trainer
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_phases import PhaseWarning, ShiftTracker

FAST = {"reference_size": 300, "n_permutations": 200, "seed": 0}


def digit_images(shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    order = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(0))  # writers mixed
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)[order] / 16.0  # (n, 1, 8, 8)
    y = torch.tensor(data.target)[order]
    if shift:
        x = x + 0.6 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return x, y


class ImageData(pl.LightningDataModule):
    def __init__(self, shift: bool = False) -> None:
        super().__init__()
        self.shift = shift

    def _loader(self, part: slice, shift: bool = False) -> DataLoader:
        x, y = digit_images(shift)
        return DataLoader(TensorDataset(x[part], y[part]), batch_size=64)

    def train_dataloader(self) -> DataLoader:
        return self._loader(slice(0, 1200))

    def val_dataloader(self) -> DataLoader:
        return self._loader(slice(1200, 1500))

    def test_dataloader(self) -> DataLoader:
        return self._loader(slice(1500, None), self.shift)


class SmallCNN(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class Tokens(Dataset):
    """Sequences of 12 token ids; the label says whether token 7 occurs. ``skew`` draws from low ids only."""

    def __init__(self, n: int, seed: int, skew: bool = False) -> None:
        generator = torch.Generator().manual_seed(seed)
        high = 8 if skew else 32
        self.tokens = torch.randint(0, high, (n, 12), generator=generator)
        self.labels = (self.tokens == 7).any(dim=1).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens[index], "label": self.labels[index]}


class TokenData(pl.LightningDataModule):
    def __init__(self, skew_test: bool = False) -> None:
        super().__init__()
        self.skew_test = skew_test

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Tokens(1024, 0), batch_size=64, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(Tokens(256, 1), batch_size=64)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(Tokens(256, 2, skew=self.skew_test), batch_size=64)


class TinyTransformer(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(16, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch["tokens"]), batch["label"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self(batch["tokens"])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self(batch["tokens"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class TwoInputs(SmallCNN):
    """``forward(image, extra, scale=...)``: an image, a second tensor and a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(3, 10)

    def forward(self, x: torch.Tensor, extra: torch.Tensor, scale: float = 1.0) -> torch.Tensor:  # type: ignore[override]
        return self.head(self.features(x)) + scale * self.extra(extra)

    def _inputs(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch[0]
        return x, x.mean(dim=(2, 3)).repeat(1, 3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(*self._inputs(batch), scale=0.5), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(*self._inputs(batch), scale=0.5)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self(*self._inputs(batch), scale=0.5)


def fit_and_test(tmp_path: Path, model: pl.LightningModule, data: Any, test_data: Any, tracker: ShiftTracker) -> dict:
    torch.manual_seed(0)
    trainer = small_trainer(
        [tracker],
        max_epochs=2,
        limit_train_batches=None,
        limit_val_batches=None,
        limit_test_batches=None,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer.fit(model, data)
        trainer.test(model, test_data, verbose=False)
    events = read_jsonl(tmp_path / "phase_events.jsonl")
    assert not [e for e in events if e["kind"] == "internal_error"], events
    return {
        "validate": [e["data"] for e in events if e["kind"] == "shift_test" and e["stage"] == "validate"],
        "test": [e["data"] for e in events if e["kind"] == "shift_test" and e["stage"] == "test"],
        "trainer": trainer,
    }


@pytest.mark.parametrize("features", ["output", "features"])
def test_cnn_module_features_are_recomputed_from_images(tmp_path: Path, features: str) -> None:
    tracker = ShiftTracker(features=features, tests=["mmd"], **FAST)
    clean = fit_and_test(tmp_path / "clean", SmallCNN(), ImageData(), ImageData(), tracker)
    assert len(clean["validate"]) == 2 and not any(t["drift"] for t in clean["validate"] + clean["test"])
    shifted = fit_and_test(
        tmp_path / "shifted", SmallCNN(), ImageData(), ImageData(shift=True), ShiftTracker(features=features, **FAST)
    )
    assert all(t["drift"] for t in shifted["test"])


def test_transformer_on_dict_batches_of_token_ids(tmp_path: Path) -> None:
    clean = fit_and_test(
        tmp_path / "clean", TinyTransformer(), TokenData(), TokenData(), ShiftTracker("encoder", **FAST)
    )
    assert clean["test"] and not any(t["drift"] for t in clean["validate"] + clean["test"])
    skewed = fit_and_test(
        tmp_path / "skewed", TinyTransformer(), TokenData(), TokenData(skew_test=True), ShiftTracker("output", **FAST)
    )
    assert all(t["drift"] for t in skewed["test"] if t["test"] == "mmd")


def test_a_forward_with_several_tensors_and_a_keyword(tmp_path: Path) -> None:
    tracker = ShiftTracker("output", tests=["mmd"], **FAST)
    result = fit_and_test(tmp_path, TwoInputs(), ImageData(), ImageData(shift=True), tracker)
    assert not any(t["drift"] for t in result["validate"]) and any(t["drift"] for t in result["test"])


def test_module_features_resume_from_a_checkpoint_and_a_test_only_run_uses_the_train_loader(tmp_path: Path) -> None:
    first = fit_and_test(tmp_path / "fit", TinyTransformer(), TokenData(), TokenData(), ShiftTracker("encoder", **FAST))
    checkpoint = tmp_path / "fit.ckpt"
    first["trainer"].save_checkpoint(checkpoint)
    model = TinyTransformer()
    resumed = ShiftTracker("encoder", **FAST)
    small_trainer([resumed], default_root_dir=tmp_path / "resumed").test(
        model, TokenData(skew_test=True), ckpt_path=checkpoint, verbose=False
    )
    [test] = [e for e in resumed.events if e.kind == "shift_test"]
    assert test.data["n_reference"] == 300 and test.data["drift"]
    fresh = ShiftTracker("encoder", **FAST)  # no fit, no checkpoint: the reference comes from train_dataloader()
    small_trainer([fresh], default_root_dir=tmp_path / "fresh").test(model, TokenData(), verbose=False)
    [test] = [e for e in fresh.events if e.kind == "shift_test"]
    assert test.data["n_reference"] == 300 and not test.data["drift"]


class RandomImages(pl.LightningDataModule):
    """3x64x64 random images (47 MiB for 1000 of them as float32)."""

    def _loader(self, n: int, seed: int) -> DataLoader:
        x = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        return DataLoader(
            TensorDataset(x, torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(seed))), 50
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(1000, 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(100, 1)

    def test_dataloader(self) -> DataLoader:
        return self._loader(100, 2)


class ImageNet64(SmallCNN):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 16 * 16, 10)


@pytest.mark.parametrize(("checkpoint_mb", "rows"), [(8.0, 170), (0.0, 0)])
def test_checkpoints_hold_at_most_checkpoint_mb_of_reference(tmp_path: Path, checkpoint_mb: float, rows: int) -> None:
    tracker = ShiftTracker("output", tests=["mmd"], n_permutations=50, checkpoint_mb=checkpoint_mb)
    trainer = small_trainer([tracker], limit_train_batches=None, limit_val_batches=1, default_root_dir=tmp_path)
    model = ImageNet64()
    trainer.fit(model, RandomImages())
    checkpoint = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(checkpoint)
    weights_only = tmp_path / "weights.ckpt"
    trainer.save_checkpoint(weights_only, weights_only=True)
    added_mib = (checkpoint.stat().st_size - weights_only.stat().st_size) / 2**20
    assert added_mib <= checkpoint_mb + 0.5  # 1000 stored images would be 47 MiB
    saved = torch.load(checkpoint, weights_only=False)["callbacks"][tracker.state_key]["reference_rows"]
    assert (0 if saved is None else saved.shape[0]) == rows  # 8 MiB / 48 KiB per image: 170 whole rows
    resumed = ShiftTracker("output", tests=["mmd"], n_permutations=50, checkpoint_mb=checkpoint_mb)
    small_trainer([resumed], default_root_dir=tmp_path / "resumed").test(
        ImageNet64(), RandomImages(), ckpt_path=checkpoint, verbose=False
    )
    [test] = [e for e in resumed.events if e.kind == "shift_test"]
    assert test.data["n_reference"] == (rows or 1000)  # 0 MiB: drawn again from train_dataloader()


MODES = {
    "gentle": {"sentinel": "warn", "freeze": "warn", "sandbox": "warn", "shift": "warn"},
    "acting": {"sentinel": "checkpoint", "freeze": "warn", "sandbox": "block", "shift": "stop"},
    "strict": {"sentinel": "suspend", "freeze": "raise", "sandbox": "raise", "shift": "raise"},
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    ("make_model", "make_data", "features"),
    [
        (SmallCNN, ImageData, "features"),
        (TinyTransformer, TokenData, "encoder"),
        (TwoInputs, ImageData, "output"),
    ],
    ids=["cnn", "dict-transformer", "two-inputs"],
)
def test_every_callback_in_every_mode_runs_clean_models_without_an_internal_error(
    tmp_path: Path, mode: str, make_model: Any, make_data: Any, features: str
) -> None:
    from lightning_phases import LossDropSentinel, ParamFreezeAssertion, SandboxCheck

    chosen = MODES[mode]
    # This matrix checks that nothing crashes or misfires, not calibration (tests/detectors/test_two_sample.py and
    # benchmarks/shift_power.py do): about ten tests per run at alpha 0.05 would false-alarm in ~40% of runs.
    shift = {**FAST, "tests": ["mmd"], "alpha": 0.001, "on_violation": chosen["shift"]}
    callbacks = [
        LossDropSentinel(on_violation=chosen["sentinel"], direction="both"),
        ParamFreezeAssertion(on_violation=chosen["freeze"], check_every_n_batches=2),
        SandboxCheck(on_violation=chosen["sandbox"]),
        ShiftTracker("input" if features == "encoder" else features, **shift),
        ShiftTracker(features, **shift, name="module_features"),
    ]
    torch.manual_seed(0)
    trainer = small_trainer(
        callbacks,
        max_epochs=2,
        limit_train_batches=None,
        limit_val_batches=None,
        limit_test_batches=None,
        default_root_dir=tmp_path,
    )
    model, data = make_model(), make_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhaseWarning)
        trainer.fit(model, data)
        trainer.validate(model, data, verbose=False)
        trainer.test(model, data, verbose=False)
    events = read_jsonl(tmp_path / "phase_events.jsonl")
    assert not [e for e in events if e["kind"] == "internal_error"], [e["message"] for e in events]
    serious = [e for e in events if e["severity"] != "info"]
    assert not serious, [e["message"] for e in serious]  # clean models, clean data: nothing to flag
