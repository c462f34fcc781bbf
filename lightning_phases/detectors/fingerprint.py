"""Bit-exact, order-sensitive tensor fingerprints that need no copy of the tensor.

The fingerprint of a tensor is ``sum_i x_i * (2i + 1) mod 2**64``, where ``x_i`` are the tensor's bytes
read as signed 32-bit words (a 1-3 byte tail as one more word) in logical element order, widened to
64 bits, together with its dtype and shape. Why this detects what ``torch.equal`` misses:

* Any change inside one word (a flipped bit, ``-0.0`` -> ``0.0``, another NaN payload) changes the sum:
  the word changes by ``d`` with ``0 < |d| < 2**32``, and ``d * (2i + 1)`` is never ``0 mod 2**64``
  because ``2i + 1`` is odd.
* A swap of two different words ``a`` at ``i`` and ``b`` at ``j`` changes the sum by
  ``(b - a) * 2 * (i - j)``, whose factor of two is at most ``2**(31 + 1 + 30)`` for tensors of fewer
  than ``2**30`` words (4 GiB), so it is never ``0 mod 2**64`` either.
* Other changes of several words cancel only when a weighted sum of their differences is a multiple of
  ``2**64``: about one chance in ``2**32`` for arbitrary corruption, never for one element.

The sum is computed on the tensor's own device. On CUDA with Triton installed it is one fused kernel
that reads the tensor once. Elsewhere it runs in blocks of :data:`BLOCK_WORDS` words with plain torch
operations (on one CPU thread when the CPU is oversubscribed), so the extra memory is a fixed workspace
(4 MiB), not a copy of the weights; the weighted sum is taken from row and column sums (see
:func:`_blocked_sum`), so it needs no per-word multiply. Small tensors are summed in groups (see
:func:`_stacked_sums`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

ROW_WORDS = 1 << 12
BLOCK_ROWS = 1 << 7
BLOCK_WORDS = ROW_WORDS * BLOCK_ROWS
SMALL_WORDS = 1 << 15  # tensors up to 128 KiB are fingerprinted in groups of one length (see _stacked_sums)
CHUNK_WORDS = 1 << 10  # see _stacked_sums: chunk sums stay exact in float64
GROUP_WORDS = 1 << 20  # a stacked group holds at most this many words (8 MiB as int64)

_column_weights: dict[torch.device, Tensor] = {}
_cpu_workspace: list[Tensor] = []  # kept: a fresh 4 MiB CPU buffer costs its page faults at every tensor


def _workspace(n_rows: int, device: torch.device) -> Tensor:
    """An int64 ``(n_rows, ROW_WORDS)`` scratch block (CUDA's caching allocator already reuses memory)."""
    if device.type != "cpu":
        return torch.empty(n_rows, ROW_WORDS, dtype=torch.int64, device=device)
    if not _cpu_workspace:
        # A normal tensor even when first made in a validation/test/predict loop (inference mode), so that a
        # later check outside it (a frozen check in training) may write into it.
        with torch.inference_mode(False):
            _cpu_workspace.append(torch.empty(BLOCK_ROWS, ROW_WORDS, dtype=torch.int64))
    return _cpu_workspace[0][:n_rows]


def _weights(device: torch.device) -> Tensor:
    weights = _column_weights.get(device)
    if weights is None:
        with torch.inference_mode(False):
            weights = _column_weights[device] = torch.arange(0, 2 * ROW_WORDS, 2, dtype=torch.int64, device=device)
    return weights


_WORD_DTYPES = {torch.float32, torch.int32, torch.float64, torch.int64}  # always 4-byte aligned, whole words


def _words(tensor: Tensor) -> tuple[Tensor, Tensor | None]:
    """The tensor's bytes in logical order as int32 words, plus its 1-3 trailing bytes (or ``None``)."""
    if tensor.dtype in _WORD_DTYPES and tensor.is_contiguous():  # the common case, in two views
        return tensor.detach().view(-1).view(torch.int32), None
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():  # reshape of a non-contiguous tensor may return a strided view
        flat = flat.contiguous()
    raw = flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
    if raw.data_ptr() % 4:  # a view at an odd offset into its storage: words need 4-byte alignment
        raw = raw.clone()
    whole = raw.numel() // 4 * 4
    words = raw[:whole].view(torch.int32)
    tail = raw[whole:] if whole < raw.numel() else None
    return words, tail


_fused_available: bool | None = None


def _fused_fingerprints(tensors: Sequence[Tensor]) -> Tensor | None:
    """Fingerprints of CUDA tensors from one fused Triton kernel; ``None`` where that is not available.

    A contiguous, 4-byte-aligned tensor whose size is a multiple of 4 bytes is read in place by address;
    any other is first turned into words by :func:`_words` (a copy only for strided or odd-offset views).
    """
    global _fused_available
    if not tensors[0].is_cuda or _fused_available is False:
        return None
    try:
        from lightning_phases.detectors import _triton_fingerprint
    except ImportError:
        _fused_available = False
        return None
    _fused_available = True
    spans, keep, tails = [], [], []
    for position, tensor in enumerate(tensors):
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.is_contiguous() and tensor.data_ptr() % 4 == 0 and nbytes % 4 == 0:
            spans.append((tensor.data_ptr(), nbytes // 4))
        else:
            words, tail = _words(tensor)
            keep.append(words)
            spans.append((words.data_ptr(), words.numel()))
            if tail is not None:
                tails.append((position, words.numel(), tail))
    sums = _triton_fingerprint.weighted_sums(tuple(spans), tensors[0].device)
    for position, n_words, tail in tails:
        sums[position] += _tail_term(n_words, tail)
    return sums


def _tail_term(n_words: int, tail: Tensor) -> Tensor:
    """The 1-3 trailing bytes as one more (unsigned) word at position ``n_words``, computed on the device."""
    shifts = torch.arange(0, 8 * tail.numel(), 8, dtype=torch.int64, device=tail.device)
    return tail.to(torch.int64).bitwise_left_shift(shifts).sum() * (2 * n_words + 1)


def _row_weights(n_rows: int, device: torch.device) -> Tensor:
    """``2 r ROW_WORDS + 1`` for rows ``r < n_rows`` (cached per device, grown on demand)."""
    weights = _row_weight_cache.get(device)
    if weights is None or weights.numel() < n_rows:
        with torch.inference_mode(False):
            size = max(n_rows, 2 * (0 if weights is None else weights.numel()), BLOCK_ROWS)
            weights = torch.arange(size, dtype=torch.int64, device=device).mul_(2 * ROW_WORDS).add_(1)
        _row_weight_cache[device] = weights
    return weights[:n_rows]


_row_weight_cache: dict[torch.device, Tensor] = {}


def _blocked_sum(words: Tensor) -> Tensor:
    """``sum_i words[i] * (2i + 1) mod 2**64`` as an int64 scalar, block by block, with torch operations.

    The words are read as rows of :data:`ROW_WORDS`; with ``i = r * ROW_WORDS + c`` the sum splits into
    ``sum_r (2 r ROW_WORDS + 1) * rowsum_r + sum_c 2c * colsum_c``. Both are plain sums over a widened
    block, so no 64-bit multiply touches every word (CPUs without AVX-512 have no vector 64-bit multiply).
    A block is small enough (4 MiB widened) to stay in cache between the widening copy and the two sums,
    so memory traffic is about one read of the tensor; three operations per block.
    """
    device = words.device
    total = torch.zeros((), dtype=torch.int64, device=device)
    n_rows = words.numel() // ROW_WORDS
    if n_rows:
        rows = words[: n_rows * ROW_WORDS].view(n_rows, ROW_WORDS)
        workspace = _workspace(min(n_rows, BLOCK_ROWS), device)
        row_sums = torch.empty(n_rows, dtype=torch.int64, device=device)
        column_sums = torch.zeros(ROW_WORDS, dtype=torch.int64, device=device)
        for first in range(0, n_rows, BLOCK_ROWS):
            block = rows[first : first + BLOCK_ROWS]
            wide = workspace[: block.shape[0]]
            wide.copy_(block)
            torch.sum(wide, dim=1, out=row_sums[first : first + block.shape[0]])
            column_sums += wide.sum(dim=0)
        total += row_sums.mul_(_row_weights(n_rows, device)).sum()
        total += column_sums.mul_(_weights(device)).sum()
    rest = words[n_rows * ROW_WORDS :]
    if rest.numel():
        index = torch.arange(n_rows * ROW_WORDS, words.numel(), dtype=torch.int64, device=device)
        total += rest.to(torch.int64).mul_(index.mul_(2).add_(1)).sum()
    return total


def cpu_oversubscribed() -> bool:
    """Whether other processes' runnable threads now need cores that torch's threads would use.

    Linux only (elsewhere: ``False``): ``/proc/loadavg`` counts every runnable thread on the machine, and
    ``/proc/self/task`` this process's own, which are not competition (OpenMP threads spin briefly after
    each parallel operation and count as runnable).
    """
    try:
        with open("/proc/loadavg") as file:
            runnable = int(file.read().split()[3].split("/")[0])
        own = 0
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/stat") as file:
                own += file.read().rpartition(")")[2].split()[0] == "R"
        cores = len(os.sched_getaffinity(0))
    except (OSError, ValueError, IndexError, AttributeError):
        return False
    return runnable - own > cores - min(torch.get_num_threads(), cores)


@contextmanager
def _cpu_threads(device: torch.device) -> Iterator[None]:
    """Run CPU fingerprints on one intra-op thread when other processes compete for the cores.

    A fingerprint is many short operations; with several OpenMP threads, each one ends at a barrier where
    threads spin-wait for the slowest. When other processes (DataLoader workers) hold the cores, a
    preempted thread makes every barrier wait a scheduler slice: measured 10-20x slower than one thread on
    a busy 2-core machine, while on an idle one torch's threads are about 1.7x faster than one.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or not cpu_oversubscribed():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_SPARSE_INDEX_PARTS = {
    torch.sparse_csr: ("crow_indices", "col_indices"),
    torch.sparse_bsr: ("crow_indices", "col_indices"),
    torch.sparse_csc: ("ccol_indices", "row_indices"),
    torch.sparse_bsc: ("ccol_indices", "row_indices"),
}
# Odd multipliers for the parts of a sparse tensor: a change within one part always changes the whole.
_PART_WEIGHTS = (1, 0x9E3779B97F4A7C15 - 2**64, 0xC2B2AE3D27D4EB4F - 2**64)


def fingerprintable(tensor: Tensor) -> bool:
    """Whether :func:`fingerprints` can see the values of ``tensor``: dense or sparse, not on the meta device.

    Args:
        tensor: Any tensor.
    """
    return not tensor.is_meta and (
        tensor.layout == torch.strided or tensor.layout in _SPARSE_INDEX_PARTS or (tensor.layout == torch.sparse_coo)
    )


def _parts(tensor: Tensor) -> list[Tensor]:
    """The dense tensors that hold ``tensor``'s values: itself, or a sparse tensor's indices and values.

    A COO tensor is read in its coalesced (canonical) form, so equal tensors give equal parts.
    """
    tensor = tensor.detach()
    if tensor.layout == torch.strided:
        return [tensor]
    if tensor.layout == torch.sparse_coo:
        canonical = tensor if tensor.is_coalesced() else tensor.coalesce()
        return [canonical.indices(), canonical.values()]
    index, other = _SPARSE_INDEX_PARTS[tensor.layout]
    return [getattr(tensor, index)(), getattr(tensor, other)(), tensor.values()]


def _device_fingerprints(tensors: Sequence[Tensor]) -> Tensor:
    """Fingerprints of tensors that all live on one (non-meta) device, as an int64 vector there."""
    if all(tensor.layout == torch.strided for tensor in tensors):
        return _dense_fingerprints(tensors)
    parts = [_parts(tensor) for tensor in tensors]
    flat = _dense_fingerprints([part for group in parts for part in group])
    sums, position = [], 0
    for group in parts:
        total = torch.zeros((), dtype=torch.int64, device=flat.device)
        for k in range(len(group)):
            total = total + flat[position + k] * _PART_WEIGHTS[k]
        sums.append(total)
        position += len(group)
    return torch.stack(sums)


def _dense_fingerprints(tensors: Sequence[Tensor]) -> Tensor:
    """Fingerprints of dense tensors that all live on one device, as an int64 vector there."""
    if not tensors:
        return torch.zeros(0, dtype=torch.int64)
    fused = _fused_fingerprints(tensors)
    if fused is not None:
        return fused
    device = tensors[0].device
    with _cpu_threads(device):
        return _dense_sums(tensors, device)


def _dense_sums(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    out = torch.zeros(len(tensors), dtype=torch.int64, device=device)
    # Small tensors go in groups of one shape and dtype (stacked as they are: no per-tensor view), or, when
    # not plainly laid out, of one word count.
    groups: dict[tuple[object, ...], list[tuple[int, Tensor]]] = {}
    for position, tensor in enumerate(tensors):
        plain = tensor.dtype in _WORD_DTYPES and tensor.is_contiguous()
        if plain and tensor.numel() * tensor.element_size() <= 4 * SMALL_WORDS:
            groups.setdefault((tensor.dtype, tensor.shape), []).append((position, tensor))
            continue
        words, tail = _words(tensor)
        if tail is None and words.numel() <= SMALL_WORDS:
            groups.setdefault((words.numel(),), []).append((position, words))
            continue
        total = _blocked_sum(words)
        out[position] = total if tail is None else total + _tail_term(words.numel(), tail)
    for group in groups.values():
        if len(group) == 1:
            out[group[0][0]] = _blocked_sum(_words(group[0][1])[0])
            continue
        rows = max(GROUP_WORDS // max(group[0][1].numel() * group[0][1].element_size() // 4, 1), 1)
        for first in range(0, len(group), rows):
            chunk = group[first : first + rows]
            positions = torch.tensor([position for position, _ in chunk], device=device)
            out[positions] = _stacked_sums([tensor for _, tensor in chunk])
    return out


def _stacked_sums(tensors: Sequence[Tensor]) -> Tensor:
    """``sum_i w[i] * (2i + 1)`` of the words of many tensors of one size at once (int32 word vectors, or
    plain float32/int32/float64/int64 tensors of one shape).

    Stacked as the rows of one matrix, the group costs a few operations instead of a few per tensor: the
    many small tensors of a model (norms, biases, LoRA adapters, repeated per layer with few distinct
    shapes) cost about as much as one tensor of their total size. Each row is cut into chunks of
    :data:`CHUNK_WORDS`; a chunk's weighted and plain sums are one float64 matrix product, exact because
    every partial sum is an integer below ``2**31 * CHUNK_WORDS**2 = 2**51`` in magnitude (float64 holds
    every integer below ``2**53``); the chunks are combined in int64.
    """
    stacked = torch.stack(list(tensors)).detach()
    words = stacked.reshape(stacked.shape[0], -1).view(torch.int32)
    pad = -words.shape[1] % CHUNK_WORDS
    if pad:
        words = torch.nn.functional.pad(words, (0, pad))  # zero words add nothing
    chunks = words.reshape(words.shape[0], -1, CHUNK_WORDS)
    device = words.device
    local = torch.stack(
        [
            torch.arange(1, 2 * CHUNK_WORDS + 1, 2, dtype=torch.float64, device=device),
            torch.ones(CHUNK_WORDS, dtype=torch.float64, device=device),
        ],
        dim=1,
    )
    parts = (chunks.to(torch.float64) @ local).to(torch.int64)  # (k, chunks, 2): weighted, plain
    offsets = torch.arange(chunks.shape[1], dtype=torch.int64, device=device).mul_(2 * CHUNK_WORDS)
    return parts[..., 0].sum(dim=1) + (parts[..., 1] * offsets).sum(dim=1)


def fingerprint(tensor: Tensor) -> Tensor:
    """The fingerprint of one tensor: an int64 scalar on the tensor's device (no host synchronisation).

    Two tensors have the same fingerprint if they hold the same bits in the same logical order; see the
    module docstring for what a change is guaranteed to alter. Dtype and shape are not part of it: compare
    them with :func:`signature`.

    Args:
        tensor: Any dense or sparse tensor (parameters, buffers), of any dtype, contiguous or not, possibly
            empty; not on the meta device.
    """
    if not fingerprintable(tensor):
        raise ValueError(f"a tensor on the {tensor.device} device with layout {tensor.layout} cannot be fingerprinted")
    return _device_fingerprints([tensor])[0]


def signature(tensor: Tensor) -> tuple[str, tuple[int, ...]]:
    """What a fingerprint does not cover: the tensor's dtype and shape (and layout, when not dense).

    Args:
        tensor: The tensor.
    """
    dtype = str(tensor.dtype) if tensor.layout == torch.strided else f"{tensor.dtype} {tensor.layout}"
    return dtype, tuple(tensor.shape)


def fingerprints(tensors: Sequence[Tensor]) -> Tensor:
    """Fingerprints of many tensors as one int64 CPU vector, with one host synchronisation per device.

    Tensors :func:`fingerprintable` refuses (meta tensors, exotic layouts) get the value 0 (nothing to
    compare); callers report them as not verifiable.

    Args:
        tensors: The tensors, e.g. every parameter and buffer of a model.
    """
    per_device: dict[torch.device, list[int]] = {}
    for position, tensor in enumerate(tensors):
        if fingerprintable(tensor):
            per_device.setdefault(tensor.device, []).append(position)
    out = torch.zeros(len(tensors), dtype=torch.int64)
    for positions in per_device.values():
        out[positions] = _device_fingerprints([tensors[p] for p in positions]).cpu()
    return out
