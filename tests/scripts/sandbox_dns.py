"""A host-name connect and sendto inside a sandboxed validate, with this process's resolver pointed at a local
UDP listener (run under ``unshare -m`` with ``/etc/resolv.conf`` bound to ``nameserver 127.0.0.1``).

Prints JSON: the names the listener saw as queries (a control look-up before the Trainer, then whatever the
sandboxed stage let out) and what each escape raised.
"""

import contextlib
import json
import socket
import sys
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2] / "examples")]

from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from helpers import small_trainer  # noqa: E402

from lightning_phases import SandboxCheck  # noqa: E402

listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
listener.bind(("127.0.0.1", 53))


def queries() -> list[str]:
    seen = []
    listener.settimeout(1.5)
    while True:
        try:
            packet, _ = listener.recvfrom(512)
        except TimeoutError:
            return seen
        labels, index = [], 12
        while index < len(packet) and packet[index]:
            labels.append(packet[index + 1 : index + 1 + packet[index]].decode(errors="replace"))
            index += 1 + packet[index]
        seen.append(".".join(labels))
        listener.settimeout(0.2)


with contextlib.suppress(OSError):
    socket.getaddrinfo("control-token.example", 80)  # unsandboxed: this query must reach the listener
control = queries()


class Leaky(DigitsClassifier):
    raised: dict[str, str]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if batch_idx == 0:
            for name, escape in (
                ("connect", lambda s: s.connect(("secret-token-connect.example", 80))),
                ("sendto", lambda s: s.sendto(b"x", ("secret-token-sendto.example", 53))),
            ):
                kind = socket.SOCK_STREAM if name == "connect" else socket.SOCK_DGRAM
                with socket.socket(socket.AF_INET, kind) as sock:
                    try:
                        escape(sock)
                        self.raised[name] = "nothing"
                    except Exception as error:
                        self.raised[name] = type(error).__name__
        super().validation_step(batch, batch_idx)


model = Leaky()
model.raised = {}
root = Path(sys.argv[1])
small_trainer([SandboxCheck()], default_root_dir=root, limit_val_batches=1).validate(
    model, DigitsDataModule(), verbose=False
)
print(json.dumps({"control": control, "sandboxed": queries(), "raised": model.raised}))
