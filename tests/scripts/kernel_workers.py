"""A validate with ``SandboxCheck(enforce="kernel")`` and two DataLoader workers (start method: argv[2]) that
try a native write outside the run's directory (argv[1]); prints JSON: whether the write landed and the events.

Run in its own interpreter so the test sees everything the confined workers print when they exit, and what they
leave in the temp directory (``TMPDIR``) after the interpreter is gone.
"""

import contextlib
import functools
import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

import torch  # noqa: E402
from digits import DigitsClassifier  # noqa: E402
from helpers import EscapingDataset, small_trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lightning_phases import SandboxCheck  # noqa: E402


def native_save(path: str) -> None:
    with contextlib.suppress(RuntimeError):  # refused: the worker goes on loading data
        torch.save(torch.zeros(3), path)  # torch's C++ writer: only the kernel refuses it


if __name__ == "__main__":
    root, start_method = Path(sys.argv[1]), sys.argv[2]
    outside = root.parent / "outside.pt"
    loader = DataLoader(
        EscapingDataset(functools.partial(native_save, str(outside))),
        batch_size=2,
        num_workers=2,
        multiprocessing_context=start_method,
    )
    sandbox = SandboxCheck(enforce="kernel")
    small_trainer([sandbox], default_root_dir=root, limit_val_batches=2).validate(
        DigitsClassifier(), loader, verbose=False
    )
    print(json.dumps({"written": outside.exists(), "events": sorted(e.kind for e in sandbox.events)}))
