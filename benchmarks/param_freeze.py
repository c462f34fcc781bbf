"""Fingerprint cost against clone() and sum() of the same tensors, for 10 MB, 100 MB and 1 GB of parameters,
on an idle and on a busy CPU, and for many small tensors against one large one.

    python benchmarks/param_freeze.py            # CPU, idle and with 2 competing worker processes
    python benchmarks/param_freeze.py --device cuda

Each model is a list of float32 tensors shaped like Linear layers. For each size the script times, over
the same tensors in the same run (median of --repeats): the fingerprints of all tensors (what one
ParamFreezeAssertion check costs, host synchronisation included), clone() of every tensor, and sum() of
every tensor; it prints their ratios, GB/s, and the extra memory the fingerprint needed. With ``--load N``
(default 2 on CPU) every row is measured again while N worker processes keep the cores busy, as a
DataLoader's workers do (pure Python work, so the competing load does not depend on torch's threads).
The last rows compare 1,000 tensors of 4 KB (e.g. LoRA adapters or norms) with one tensor of 4 MB.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import time
from contextlib import contextmanager

import torch

from lightning_phases.detectors.fingerprint import fingerprints


def make_model(megabytes: int, device: str) -> list[torch.Tensor]:
    """Linear-layer-shaped float32 tensors adding up to ``megabytes`` (1 MB = 1e6 bytes)."""
    remaining = megabytes * 1_000_000 // 4
    tensors, width = [], 1024
    generator = torch.Generator(device=device).manual_seed(0)
    while remaining > 0:
        rows = min(max(remaining // width, 1), 4096)
        tensors.append(torch.randn(rows, width, device=device, generator=generator))
        tensors.append(torch.randn(rows, device=device, generator=generator))
        remaining -= rows * width + rows
    return tensors


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str, repeats: int) -> float:
    function()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def extra_memory(function, device: str) -> float | None:
    """Peak device memory allocated by ``function`` beyond what was allocated before, in MB (CUDA only)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    function()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def _busy(stop: multiprocessing.synchronize.Event) -> None:
    """A DataLoader-like worker: Python work that never yields the core until told to stop."""
    x = 0
    while not stop.is_set():
        for i in range(10_000):
            x = (x * 31 + i) % 1_000_003


@contextmanager
def competing_load(workers: int):
    """``workers`` busy processes for the duration of the block."""
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    procs = [context.Process(target=_busy, args=(stop,), daemon=True) for _ in range(workers)]
    for proc in procs:
        proc.start()
    time.sleep(0.5)  # let them start spinning
    try:
        yield
    finally:
        stop.set()
        for proc in procs:
            proc.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="10,100,1000", help="model sizes in MB")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--load", type=int, default=None, help="competing worker processes (default: 2 on CPU)")
    args = parser.parse_args()
    load = args.load if args.load is not None else (0 if args.device.startswith("cuda") else 2)
    name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    )
    print(
        f"# ParamFreezeAssertion fingerprint benchmark: torch {torch.__version__}, device {args.device} ({name}), "
        f"{torch.get_num_threads()} CPU threads, median of {args.repeats}"
    )
    print(
        "| CPU | params | tensors | fingerprint ms | clone ms | sum ms | fp/clone | fp/sum | fp GB/s | clone GB/s "
        "| fp extra MB | clone extra MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    models = {megabytes: make_model(megabytes, args.device) for megabytes in (int(s) for s in args.sizes.split(","))}
    small = [torch.randn(1024, device=args.device) for _ in range(1000)]
    large = [torch.randn(1024 * 1000, device=args.device)]
    settings = [("idle", 0)] + ([(f"busy ({load} workers)", load)] if load else [])
    many_rows = []
    for label, workers in settings:
        with competing_load(workers):
            for tensors in models.values():
                print(f"| {label} " + row(tensors, args.device, args.repeats))
            many = timed(lambda: fingerprints(small), args.device, args.repeats)
            one = timed(lambda: fingerprints(large), args.device, args.repeats)
            many_rows.append(f"| {label} | {many * 1e3:.2f} | {one * 1e3:.2f} | {many / one:.2f} |")
    print()
    print("| CPU | 1,000 tensors of 4 KB: fingerprint ms | one 4 MB tensor: fingerprint ms | ratio |")
    print("|---|---|---|---|")
    print("\n".join(many_rows))


def row(tensors: list[torch.Tensor], device: str, repeats: int) -> str:
    """One table row: fingerprint, clone and sum of ``tensors``, timed in the same run."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    fp = timed(lambda: fingerprints(tensors), device, repeats)
    clone = timed(lambda: [t.clone() for t in tensors], device, repeats)
    total = timed(lambda: [t.sum() for t in tensors], device, repeats)
    fp_mem = extra_memory(lambda: fingerprints(tensors), device)
    clone_mem = extra_memory(lambda: [t.clone() for t in tensors], device)
    mem = f"{fp_mem:.1f} | {clone_mem:.1f}" if fp_mem is not None else "<= 8.4 (workspace bound) | = params"
    return (
        f"| {nbytes / 1e6:.0f} MB | {len(tensors)} | {fp * 1e3:.1f} | {clone * 1e3:.1f} | {total * 1e3:.1f} "
        f"| {fp / clone:.2f} | {fp / total:.2f} | {nbytes / fp / 1e9:.1f} | {nbytes / clone / 1e9:.1f} | {mem} |"
    )


if __name__ == "__main__":
    main()
