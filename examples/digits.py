"""A small, real example: scikit-learn's handwritten digits (ships with scikit-learn, no download).

``DigitsDataModule`` splits the 1,797 8x8 images into train/val/test with a fixed seed; predict uses the
test images. ``DigitsClassifier`` is an MLP with a ``backbone`` (Linear, BatchNorm, ReLU, Dropout) and a
``head``, so that stages where BatchNorm statistics and dropout behave differently are exercised, and the
backbone can be frozen. With ``tool_call=True`` the model also behaves like a tool-using model: once per
validation run it asks a local HTTP "tool" for help, the kind of escape ``SandboxCheck`` blocks.
"""

from __future__ import annotations

import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, random_split
from typing_extensions import override

LEAK_PIXELS = [0, 8, 16, 24, 32, 40, 48, 56, 7, 15]  # border pixels that are blank in every digits image

Shift = Literal["none", "noise", "imbalance", "knockout"]


def shift_digits(
    x: torch.Tensor, y: torch.Tensor, kind: Shift, strength: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A shifted copy of digit images: the distribution shifts Failing Loudly (Rabanser et al.) studies.

    Args:
        x: Images, ``(n, 64)`` in [0, 1].
        y: Labels, ``(n,)``.
        kind: ``"noise"`` (Gaussian noise of std ``strength``, clipped to [0, 1]), ``"imbalance"`` (only the
            classes 0-4 remain), ``"knockout"`` (a fixed random ``strength`` fraction of pixels set to 0) or
            ``"none"``.
        strength: How strong the shift is.
        generator: Random source, for a reproducible shift.
    """
    if kind == "noise":
        return (x + strength * torch.randn(x.shape, generator=generator)).clamp(0.0, 1.0), y
    if kind == "imbalance":
        keep = y < 5
        return x[keep], y[keep]
    if kind == "knockout":
        x = x.clone()
        x[:, torch.randperm(x.shape[1], generator=generator)[: round(strength * x.shape[1])]] = 0.0
        return x, y
    return x, y


class DigitsDataModule(pl.LightningDataModule):
    """The digits data set as float tensors in [0, 1] of shape (64,), with integer labels 0-9.

    Args:
        batch_size: Samples per batch.
        val_size: Images held out for validation.
        test_size: Images held out for test and predict.
        seed: Seed of the split.
        num_workers: DataLoader worker processes.
        label_noise: Fraction of training labels replaced, once and with the split's seed, by random ones,
            so the training loss plateaus as it does on real, noisy data.
        test_shift: Shift the test (and predict) split away from the training data: ``"noise"``,
            ``"imbalance"``, ``"knockout"`` (see :func:`shift_digits`), or ``"none"``.
        shift_strength: Strength of ``test_shift``.
    """

    def __init__(
        self,
        batch_size: int = 32,
        val_size: int = 300,
        test_size: int = 297,
        seed: int = 0,
        num_workers: int = 0,
        label_noise: float = 0.0,
        test_shift: Shift = "none",
        shift_strength: float = 0.5,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_size = val_size
        self.test_size = test_size
        self.seed = seed
        self.num_workers = num_workers
        self.label_noise = label_noise
        self.test_shift = test_shift
        self.shift_strength = shift_strength

    @override
    def setup(self, stage: str) -> None:
        images, labels = load_digits(return_X_y=True)
        data = TensorDataset(torch.tensor(images, dtype=torch.float32) / 16.0, torch.tensor(labels))
        n_train = len(data) - self.val_size - self.test_size
        generator = torch.Generator().manual_seed(self.seed)
        self.train_set, self.val_set, self.test_set = random_split(
            data, [n_train, self.val_size, self.test_size], generator=generator
        )
        if self.label_noise:
            x, y = data.tensors
            y = y.clone()
            train = torch.tensor(self.train_set.indices)
            flip = train[torch.rand(len(train), generator=generator) < self.label_noise]
            y[flip] = torch.randint(0, 10, (len(flip),), generator=generator)
            self.train_set.dataset = TensorDataset(x, y)
        if self.test_shift != "none":
            x, y = data.tensors
            test = torch.tensor(self.test_set.indices)
            self.test_set = TensorDataset(
                *shift_digits(x[test], y[test], self.test_shift, self.shift_strength, generator)
            )

    def _loader(self, dataset: TensorDataset, shuffle: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set)


class _ToolHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"the answer is 7"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep the demo's console readable
        pass


class LocalTool:
    """A "tool" the model can call: an HTTP server on 127.0.0.1 in a background thread of this process."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _ToolHandler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ask"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def call(self) -> bool:
        """Ask the tool; ``False`` when the call failed or was blocked (a blocked call raises an ``OSError``)."""
        try:
            with urllib.request.urlopen(self.url, timeout=2) as answer:
                return answer.read() == b"the answer is 7"
        except OSError:
            return False

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class DigitsClassifier(pl.LightningModule):
    """MLP classifier for 8x8 digits with a BatchNorm/Dropout ``backbone`` and a linear ``head``.

    Args:
        hidden: Width of the hidden layer.
        dropout: Dropout probability after the hidden layer.
        lr: Learning rate of AdamW.
        weight_decay: Weight decay of AdamW.
        freeze_backbone: Freeze the backbone (``requires_grad=False``, kept out of the optimizer, eval mode).
        leak_label_from_step: From this global step on, the training data pipeline writes each sample's label
            one-hot into blank border pixels (a label leak, for the demo); -1: never.
        leak_in_validation: Leak the label into validation batches too (a leak that reaches the held-out data
            looks like a capability there as well).
        tool_call: At the first validation batch of each run, call a local HTTP tool that the model starts
            in ``setup`` (a tool-using model reaching outside the sandbox, for the demo); logs ``val_tool_ok``.
        mutate_in_test: At the first test batch, nudge the head's weights in place, as a buggy test step or
            test-time adaptation left on by mistake would (for the demo).
    """

    # save_hyperparameters() copies every argument from this frame into self.hparams; those marked ARG002 are
    # read from there (Lightning's pattern, which also puts them in checkpoints), not from the local names.
    def __init__(
        self,
        hidden: int = 128,
        dropout: float = 0.1,
        lr: float = 3e-3,  # noqa: ARG002
        weight_decay: float = 1e-4,  # noqa: ARG002
        freeze_backbone: bool = False,
        leak_label_from_step: int = -1,  # noqa: ARG002
        leak_in_validation: bool = False,  # noqa: ARG002
        tool_call: bool = False,  # noqa: ARG002
        mutate_in_test: bool = False,  # noqa: ARG002
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tool: LocalTool | None = None
        self.backbone = nn.Sequential(nn.Linear(64, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, 10)
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    @override
    def setup(self, stage: str) -> None:
        if self.hparams.tool_call and self.tool is None:
            self.tool = LocalTool()

    @override
    def teardown(self, stage: str) -> None:
        if self.tool is not None:
            self.tool.close()
            self.tool = None

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @override
    def on_train_epoch_start(self) -> None:
        if self.hparams.freeze_backbone:
            self.backbone.eval()  # frozen BatchNorm keeps its running statistics

    def leak(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch with its label leaked into the inputs, once ``leak_label_from_step`` is reached."""
        x, y = batch
        start = self.hparams.leak_label_from_step
        if start < 0 or self.global_step < start or self.trainer.sanity_checking:
            return x, y
        x = x.clone()
        x[:, LEAK_PIXELS] = nn.functional.one_hot(y, 10).to(x.dtype) * 4
        return x, y

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        leaked = stage == "train" or (stage == "val" and self.hparams.leak_in_validation)
        x, y = self.leak(batch) if leaked else batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.log(f"{stage}_loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True)
        self.log(f"{stage}_acc", (logits.argmax(-1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        # Only in a real validation run: LossDropSentinel's triage also runs validation_step on a few cached
        # batches while training, to see whether a drop of the training loss shows on held-out data too.
        if self.tool is not None and batch_idx == 0 and not self.trainer.training:
            self.log("val_tool_ok", float(self.tool.call()), on_epoch=True)
        self._step(batch, "val")

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        if self.hparams.mutate_in_test and batch_idx == 0:
            with torch.no_grad():
                self.head.weight.mul_(1.001)
        self._step(batch, "test")

    @override
    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).softmax(-1)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
