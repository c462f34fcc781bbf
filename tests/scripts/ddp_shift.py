"""2-process CPU DDP fit with ShiftTracker: writes each rank's shift test results.

The reference reservoir is large enough to hold every training sample, so both ranks together hold exactly
the samples a single process would; the test must then give the same p-value.
"""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from helpers import small_trainer  # noqa: E402

from lightning_phases import ShiftTracker  # noqa: E402

out = Path(sys.argv[1])
features = sys.argv[2] if len(sys.argv) > 2 else "input"
tracker = ShiftTracker(features=features, reference_size=2000, n_permutations=500, track_rates=False)
trainer = small_trainer(
    [tracker], devices=2, strategy="ddp", limit_train_batches=None, limit_val_batches=None, default_root_dir=out
)
trainer.fit(DigitsClassifier(), DigitsDataModule())
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps(tracker.results))
