"""The reservoir sample: uniform inclusion, slices while filling, and an exact continuation after a restart."""

import torch

from lightning_phases.detectors.reservoir import Reservoir


def test_every_row_is_kept_with_probability_capacity_over_seen():
    counts = torch.zeros(100)
    runs = 3000
    for seed in range(runs):
        reservoir = Reservoir(10, seed=seed)
        for start in range(0, 100, 7):  # uneven batches, the last one short
            reservoir.add(torch.arange(start, min(start + 7, 100)).float()[:, None])
        assert len(reservoir) == 10 and len(set(reservoir.sample[:, 0].tolist())) == 10
        counts[reservoir.sample[:, 0].long()] += 1
    expected = runs * 10 / 100  # 300, binomial standard deviation ~16.4
    assert (counts - expected).abs().max() < 5 * 16.4
    assert counts[:50].sum() / counts.sum() > 0.45  # early rows are not favoured or starved
    assert counts[:50].sum() / counts.sum() < 0.55


def test_rows_are_kept_in_order_until_the_reservoir_is_full():
    reservoir = Reservoir(8)
    reservoir.add(torch.arange(5).float()[:, None])
    reservoir.add(torch.arange(5, 8).float()[:, None])
    assert reservoir.sample[:, 0].tolist() == list(range(8)) and reservoir.seen == 8


def test_state_dict_continues_exactly():
    first, second = Reservoir(16, seed=3), Reservoir(16, seed=99)
    batches = [torch.randn(6, 4, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    for batch in batches[:6]:
        first.add(batch)
    second.load_state_dict(first.state_dict())
    for batch in batches[6:]:
        first.add(batch)
        second.add(batch)
    assert torch.equal(first.sample, second.sample) and first.seen == second.seen == 72


def test_skipping_stays_uniform_far_beyond_the_capacity():
    """Algorithm L skips most rows once seen >> capacity; every stretch of the stream must still be kept
    equally often (here 100 rows per kept one, in batches that straddle the draws)."""
    runs, capacity, total = 4000, 4, 400
    counts = torch.zeros(total)
    for seed in range(runs):
        reservoir = Reservoir(capacity, seed=seed)
        for start in range(0, total, 33):
            reservoir.add(torch.arange(start, min(start + 33, total)).float()[:, None])
        kept = reservoir.sample[:, 0].long()
        assert len(set(kept.tolist())) == capacity
        counts[kept] += 1
    per_stretch = counts.reshape(10, 40).sum(1)  # ten stretches of 40 rows, each expected 1,600 times
    expected = runs * capacity / 10
    deviation = (expected * (1 - 0.1)) ** 0.5  # binomial standard deviation, ~38
    assert (per_stretch - expected).abs().max() < 5 * deviation, per_stretch.tolist()


def test_a_state_saved_without_skips_continues_uniformly():
    """A checkpoint written before Algorithm L (no ``weight``/``next``) resumes with the same uniformity."""
    runs, capacity, total, saved_at = 4000, 4, 400, 198
    counts = torch.zeros(total)
    for seed in range(runs):
        first = Reservoir(capacity, seed=seed)
        for start in range(0, saved_at, 33):
            first.add(torch.arange(start, min(start + 33, saved_at)).float()[:, None])
        state = first.state_dict()
        del state["weight"], state["next"]
        resumed = Reservoir(capacity, seed=0)
        resumed.load_state_dict(state)
        for start in range(saved_at, total, 33):
            resumed.add(torch.arange(start, min(start + 33, total)).float()[:, None])
        counts[resumed.sample[:, 0].long()] += 1
    per_stretch = counts.reshape(10, 40).sum(1)
    expected = runs * capacity / 10
    assert (per_stretch - expected).abs().max() < 5 * (expected * 0.9) ** 0.5, per_stretch.tolist()


def test_a_sample_started_in_inference_mode_keeps_filling_outside_it() -> None:
    reservoir = Reservoir(8, seed=0)
    with torch.inference_mode():
        reservoir.add(torch.randn(4, 3))
    reservoir.add(torch.randn(20, 3))  # in-place writes into the buffer made in inference mode
    assert reservoir.sample is not None and reservoir.sample.shape == (8, 3) and reservoir.seen == 24
