"""All four callbacks under Lightning's FSDP strategy on one GPU (run on a machine with CUDA).

Writes what each callback saw to <out>/fsdp.json: event kinds, the freeze checks, the shift tests.
"""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402

from lightning_phases import LossDropSentinel, ParamFreezeAssertion, SandboxCheck, ShiftTracker  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
callbacks = [
    LossDropSentinel(),
    ParamFreezeAssertion(on_violation="warn"),
    SandboxCheck(),
    ShiftTracker(reference_size=500, n_permutations=500),
]
trainer = pl.Trainer(
    accelerator="gpu",
    devices=1,
    strategy="fsdp",
    max_epochs=6,
    logger=False,
    enable_progress_bar=False,
    enable_checkpointing=False,
    callbacks=callbacks,
    default_root_dir=out,
)
model = DigitsClassifier(leak_label_from_step=150, mutate_in_test=True)
trainer.fit(model, DigitsDataModule())
trainer.test(model, DigitsDataModule(test_shift="noise", shift_strength=0.3), verbose=False)
kinds = sorted({e.kind for cb in callbacks for e in cb.events})
result = {
    "torch": torch.__version__,
    "lightning": pl.__version__,
    "device": torch.cuda.get_device_name(0),
    "kinds": kinds,
    "shift": callbacks[3].results,
    "observations": [o.text() for cb in callbacks for o in cb.phase_observations()],
}
(out / "fsdp.json").write_text(json.dumps(result, indent=1))
print(json.dumps({"kinds": kinds}))
