"""An induction-head phase change in a real Trainer: a 2-layer attention-only transformer on repeated tokens.

Sequences are ``half`` random tokens repeated once. The first half cannot be predicted (loss ln(vocab)); the
second half can, once the model forms induction heads (attend to the token after the previous occurrence of the
current one), and the loss falls from about ln(vocab) to about half of it within a few hundred steps, after a
long plateau. Held-out sequences (other random tokens) fall with it: the capability generalises.
"""

import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override


def _small_models():
    """The corpus generators' models (``benchmarks/curves/small_models.py``): the same transformer as the corpus."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "curves" / "small_models.py"
    spec = importlib.util.spec_from_file_location("corpus_small_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class InductionModel(pl.LightningModule):
    """Next-token prediction on repeated random tokens; logs ``val_loss`` in validation.

    Args:
        vocab: Tokens.
        half: Length of the random half (sequences are twice as long).
        width: Model width.
        lr: Adam's learning rate.
    """

    def __init__(self, vocab: int = 64, half: int = 16, width: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.vocab, self.lr = vocab, lr
        self.model = _small_models().AttentionOnly(vocab, 2 * half, width=width)

    @override
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def _loss(self, batch: list[torch.Tensor]) -> torch.Tensor:
        tokens = batch[0]
        logits = self(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.reshape(-1, self.vocab), tokens[:, 1:].reshape(-1))

    @override
    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._loss(batch)

    @override
    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def repeated_tokens(n: int, seed: int, vocab: int = 64, half: int = 16, batch_size: int = 32) -> DataLoader:
    """``n`` sequences of ``half`` random tokens repeated once, in batches, from generator ``seed``."""
    first = torch.randint(0, vocab, (n, half), generator=torch.Generator().manual_seed(seed))
    return DataLoader(TensorDataset(torch.cat([first, first], 1)), batch_size=batch_size)
