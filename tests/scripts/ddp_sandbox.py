"""2-process CPU DDP fit with SandboxCheck(on_violation="warn"): only rank 1 writes outside the allowed directories.

Rank 1's violation must reach the one event log that rank 0 writes, with rank 1 named in it. Rank 1 writes late
(after rank 0 has finished validating: nothing synchronises the ranks between there and the fit's end), as a
slower rank on a busy host does.
"""

import json
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from helpers import small_trainer, write_file  # noqa: E402

from lightning_phases import SandboxCheck  # noqa: E402

out = Path(sys.argv[1])


class EscapeOnRankOne(DigitsClassifier):
    def validation_step(self, batch, batch_idx):
        if self.global_rank == 1 and batch_idx == 0 and not self.trainer.sanity_checking:
            time.sleep(3)
            write_file(str(out / "outside_rank1.txt"))
        super().validation_step(batch, batch_idx)


sandbox = SandboxCheck(on_violation="warn")
trainer = small_trainer([sandbox], devices=2, strategy="ddp", default_root_dir=out / "root")
trainer.fit(EscapeOnRankOne(), DigitsDataModule())
held = [e.to_dict() for e in sandbox.events]
(out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"held": held}))
