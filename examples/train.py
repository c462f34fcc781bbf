"""LightningCLI entry point of the digits example.

python examples/train.py fit --config examples/config.yaml     # fits, then tests (--test_after_fit=false: fit only)
python examples/train.py test --config examples/config.yaml --ckpt_path <checkpoint>
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import DigitsClassifier, DigitsDataModule


class DigitsCLI(LightningCLI):
    """LightningCLI that reports a constructor's ``ValueError``/``TypeError`` as a usage error (exit 2).

    Types in the callbacks' signatures already let the parser refuse most bad values before anything is
    built; the few checks only a constructor can make (e.g. a pattern's syntax) then read the same way.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=True, help="After fit, test the fitted model on the test split."
        )

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit", True):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            self.parser.error(str(error).strip())


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` (used by the tests).

    Args:
        args: Command-line arguments, e.g. ``["fit", "--config", "examples/config.yaml"]``.
    """
    # the demo runs again in place: its saved config (runs/config.yaml) is replaced, not refused
    return DigitsCLI(DigitsClassifier, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
