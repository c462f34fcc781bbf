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


def _table(words: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device, *((w.data_ptr(), w.numel()) for w in words))
    cached = _TABLES.get(key)
    if cached is not None:
        _TABLES.move_to_end(key)
        return cached
    lengths = torch.tensor([w.numel() for w in words], dtype=torch.int64)
    blocks = (lengths + BLOCK - 1) // BLOCK
    owner = torch.repeat_interleave(torch.arange(len(words)), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    first = (torch.arange(int(blocks.sum())) - first_block[owner]) * BLOCK
    addresses = torch.tensor([w.data_ptr() for w in words], dtype=torch.int64)
    table = torch.stack([addresses[owner], lengths[owner], first], dim=1).reshape(-1)
    cached = (table.to(device), owner.to(device))
    _TABLES[key] = cached
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return cached


def weighted_sums(words: list[torch.Tensor]) -> torch.Tensor:
    """``sum_i w[i] * (2i + 1) mod 2**64`` for each contiguous 1-D int32 tensor ``w`` on one CUDA device.

    Args:
        words: The tensors' bytes as int32 words (4-byte aligned), all on the same CUDA device.
    """
    device = words[0].device
    sums = torch.zeros(len(words), dtype=torch.int64, device=device)
    table, owner = _table(words, device)
    if owner.numel():
        partial = torch.empty(owner.numel(), dtype=torch.int64, device=device)
        _weighted_partial_sums[(owner.numel(),)](table, partial, BLOCK=BLOCK)
        sums.index_add_(0, owner, partial)
    return sums
