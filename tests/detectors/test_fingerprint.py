import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_phases.detectors.fingerprint import BLOCK_WORDS, ROW_WORDS, fingerprint, fingerprints

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def random_tensor(dtype, shape, seed):
    """A tensor of ``dtype`` and ``shape`` whose bits are uniformly random (NaNs and -0.0 included)."""
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw &= 1  # a bool byte holds 0 or 1
    return raw.view(dtype).reshape(shape)


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_flipping_any_single_bit_changes_the_fingerprint(dtype, shape, seed, data):
    tensor = random_tensor(dtype, shape, seed)
    before = fingerprint(tensor)
    flat = tensor.view(-1)
    element = data.draw(st.integers(0, flat.numel() - 1))
    bits = 8 * tensor.element_size()
    bit = data.draw(st.integers(0, bits - 1))
    if dtype == torch.bool:
        flat.view(torch.uint8)[element] ^= 1  # a bool holds one meaningful bit
    else:
        as_int = flat.view(INT_VIEW[tensor.element_size()])
        as_int[element] ^= (1 << bit) if bit < bits - 1 else -(1 << bit)
    assert fingerprint(tensor) != before


@settings(max_examples=100, deadline=None)
@given(dtype=st.sampled_from(DTYPES), n=st.integers(2, 5000), seed=st.integers(0, 2**31 - 1), data=st.data())
def test_swapping_two_different_elements_changes_the_fingerprint(dtype, n, seed, data):
    tensor = random_tensor(dtype, [n], seed)
    i, j = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, n - 1))
    as_int = tensor.view(torch.uint8) if dtype == torch.bool else tensor.view(INT_VIEW[tensor.element_size()])
    if i == j or as_int[i] == as_int[j]:
        return
    before = fingerprint(tensor)
    as_int[[i, j]] = as_int[[j, i]]
    assert fingerprint(tensor) != before


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), other_seed=st.integers(0, 2**31 - 1))
def test_fingerprint_is_independent_of_unrelated_tensors(seed, other_seed):
    tensor = random_tensor(torch.float32, [33, 7], seed)
    alone = fingerprint(tensor)
    other = random_tensor(torch.float32, [100], other_seed)
    together = fingerprints([other, tensor, other * 2])
    assert together[1] == alone
    other.add_(1)
    assert fingerprints([other, tensor])[1] == alone


def test_signed_zero_nan_payloads_and_positions_beyond_one_row():
    zeros = torch.zeros(3 * ROW_WORDS + 5)
    negative = zeros.clone()
    negative[2 * ROW_WORDS + 7] = -0.0
    assert torch.equal(zeros, negative) and fingerprint(zeros) != fingerprint(negative)
    nan = torch.full((10,), float("nan"))
    payload = nan.clone()
    payload.view(torch.int32)[4] ^= 1
    assert torch.isnan(payload).all() and fingerprint(nan) != fingerprint(payload)


def test_large_tensor_lowest_bit_in_the_last_block():
    big = torch.randn(3_000_000)
    before = fingerprint(big)
    big.view(torch.int32)[-1] ^= 1
    assert fingerprint(big) != before


def test_matches_the_definition_across_blocks_rows_and_a_byte_tail():
    """The row/column-sum evaluation equals sum_i x_i (2i + 1) mod 2**64 computed the plain way (numpy's
    int64 arithmetic wraps mod 2**64), for a tensor spanning several blocks, a partial row and a tail."""
    n_bytes = 4 * (2 * BLOCK_WORDS + 3 * ROW_WORDS + 17) + 3
    raw = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    words = raw[: n_bytes // 4 * 4].view(torch.int32).numpy().astype(np.int64)
    tail = raw[n_bytes // 4 * 4 :].numpy().astype(np.int64)
    with np.errstate(over="ignore"):
        expected = (words * (2 * np.arange(words.size, dtype=np.int64) + 1)).sum()
        expected += int((tail << (8 * np.arange(tail.size))).sum()) * (2 * words.size + 1)
    assert int(fingerprint(raw)) == int(expected)


def test_a_swap_of_equal_columns_in_distant_rows_changes_the_fingerprint():
    """Two words in the same column of different rows share their column weight: only the row weight
    tells them apart, and it must."""
    tensor = torch.randn(BLOCK_WORDS + 5 * ROW_WORDS)
    words = tensor.view(torch.int32)
    before = fingerprint(tensor)
    i, j = 3, BLOCK_WORDS + 4 * ROW_WORDS + 3
    words[[i, j]] = words[[j, i]]
    assert fingerprint(tensor) != before


def test_non_contiguous_zero_size_and_meta():
    matrix = torch.randn(50, 70)
    assert fingerprint(matrix.t()) == fingerprint(matrix.t().contiguous())
    assert fingerprint(matrix.t()) != fingerprint(matrix)  # logical order counts
    assert int(fingerprint(torch.empty(0, 3))) == 0
    with pytest.raises(ValueError, match="meta device"):
        fingerprint(torch.empty(3, device="meta"))
    assert fingerprints([torch.empty(3, device="meta"), matrix])[0] == 0


def test_a_first_check_in_inference_mode_does_not_break_a_later_check_outside_it() -> None:
    """Lightning runs validation/test/predict in inference mode; cached buffers made there must stay writable."""
    from lightning_phases.detectors import fingerprint as module

    module._cpu_workspace.clear()
    module._column_weights.clear()
    tensor = torch.randn(3 * module.BLOCK_WORDS + 5)
    with torch.inference_mode():
        inside = fingerprints([tensor])
    outside = fingerprints([tensor])  # writes into the cached workspace outside inference mode
    assert torch.equal(inside, outside)


def test_many_small_tensors_fingerprinted_together_match_one_by_one_and_threads_are_restored():
    """The grouped path (padded rows) gives each tensor the same value as fingerprinting it alone."""
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(n, generator=generator) for n in (0, 1, 2, 5, 1024, 1024, 4095, 4097, 40_000)]
    tensors += [torch.randn(6, 4, generator=generator).t(), torch.randn(9, dtype=torch.float64, generator=generator)]
    tensors += [torch.randn(7, generator=generator).half(), torch.arange(6, dtype=torch.int16)]
    tensors += [torch.randn(1024, generator=generator) for _ in range(300)]
    threads = torch.get_num_threads()
    together = fingerprints(tensors)
    assert torch.get_num_threads() == threads
    alone = torch.stack([fingerprint(t) for t in tensors])
    assert torch.equal(together, alone)
    tensors[-1][17] = -tensors[-1][17]  # one sign bit in the last of 300 equal-sized tensors
    changed = fingerprints(tensors) != together
    assert changed.tolist() == [False] * (len(tensors) - 1) + [True]
