"""Pure algorithms, usable and testable without a Trainer."""
