"""2-process CPU DDP: one rank's weights differ or change; both ranks must report and raise alike."""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from helpers import small_trainer  # noqa: E402

from lightning_phases import ParameterChangedError, ParamFreezeAssertion  # noqa: E402


class RankOneMisbehaves(DigitsClassifier):
    def __init__(self):
        super().__init__()
        self.mode = None

    def test_step(self, batch, batch_idx):
        if self.mode == "change_in_test" and self.global_rank == 1 and batch_idx == 0:
            with torch.no_grad():
                self.backbone[0].weight[0, 0] *= 2
        return super().test_step(batch, batch_idx)


class PerturbRankOne(pl.Callback):
    """Runs before ParamFreezeAssertion in on_test_start, after DDP wrapped (and synced) the model."""

    def on_test_start(self, trainer, pl_module):
        if pl_module.mode == "perturb_at_start" and trainer.global_rank == 1:
            with torch.no_grad():
                pl_module.head.bias[0] += 1e-3


out = Path(sys.argv[1])
check = ParamFreezeAssertion()
trainer = small_trainer(
    [PerturbRankOne(), check],
    devices=2,
    strategy="ddp",
    limit_train_batches=4,
    limit_val_batches=2,
    limit_test_batches=2,
    default_root_dir=out,
)
model, data = RankOneMisbehaves(), DigitsDataModule()
trainer.fit(model, data)
outcomes = {"fit_events": len(check.events)}
for mode in ("perturb_at_start", "change_in_test"):
    model.mode = mode
    try:
        trainer.test(model, data, verbose=False)
        outcomes[mode] = None
    except ParameterChangedError as error:
        outcomes[mode] = error.event.to_dict()
    if mode == "perturb_at_start":  # make the replicas equal again before the next check
        model.mode = None
        with torch.no_grad():
            torch.distributed.broadcast(model.head.bias.data, src=0)
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(outcomes))
