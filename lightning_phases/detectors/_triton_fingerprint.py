"""The fingerprint's weighted sums as one fused Triton kernel for all CUDA tensors of a check.

Each program reads one block of ``BLOCK`` int32 words of one tensor, widens them to int64, multiplies
word ``i`` of its tensor by ``2i + 1`` and writes one partial sum; ``index_add_`` adds the partials of
each tensor (int64, wrapping mod ``2**64``). The result equals the blocked torch computation bit for bit,
at the cost of one read of the tensors and one kernel launch per check, however many tensors there are.
A table of (address, length, first word) per block is built on the host once for a given set of tensors
and kept on the device, so later checks of the same tensors copy nothing to the device.
Imported only when CUDA tensors are fingerprinted and Triton is installed.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

BLOCK = 4096
_TABLES: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_MAX_TABLES = 8


@triton.jit
def _weighted_partial_sums(table_ptr, partial_ptr, BLOCK: tl.constexpr):
    block = tl.program_id(0).to(tl.int64)
    address = tl.load(table_ptr + 3 * block)
    n_words = tl.load(table_ptr + 3 * block + 1)
    first = tl.load(table_ptr + 3 * block + 2)
    words = address.to(tl.pointer_type(tl.int32))
    index = first + tl.arange(0, BLOCK).to(tl.int64)
    word = tl.load(words + index, mask=index < n_words, other=0).to(tl.int64)
    tl.store(partial_ptr + block, tl.sum(word * (index * 2 + 1), axis=0))


def _table(spans: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device, spans)
    cached = _TABLES.get(key)
    if cached is not None:
        _TABLES.move_to_end(key)
        return cached
    addresses = torch.tensor([address for address, _ in spans], dtype=torch.int64)
    lengths = torch.tensor([n_words for _, n_words in spans], dtype=torch.int64)
    blocks = (lengths + BLOCK - 1) // BLOCK
    owner = torch.repeat_interleave(torch.arange(len(spans)), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    first = (torch.arange(int(blocks.sum())) - first_block[owner]) * BLOCK
    table = torch.stack([addresses[owner], lengths[owner], first], dim=1).reshape(-1)
    cached = (table.to(device), owner.to(device))
    _TABLES[key] = cached
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return cached


def weighted_sums(spans: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    """``sum_i w[i] * (2i + 1) mod 2**64`` for each span of int32 words ``w`` in one CUDA device's memory.

    The caller keeps the tensors that own the spans alive until the result is used.

    Args:
        spans: ``(address, n_words)`` of each tensor's bytes as int32 words; addresses 4-byte aligned.
        device: The CUDA device that holds them.
    """
    sums = torch.zeros(len(spans), dtype=torch.int64, device=device)
    table, owner = _table(spans, device)
    if owner.numel():
        partial = torch.empty(owner.numel(), dtype=torch.int64, device=device)
        _weighted_partial_sums[(owner.numel(),)](table, partial, BLOCK=BLOCK)
        sums.index_add_(0, owner, partial)
    return sums
