"""Fingerprint cost against clone() and sum() of the same tensors, for 10 MB, 100 MB and 1 GB of parameters.

    python benchmarks/param_freeze.py            # CPU
    python benchmarks/param_freeze.py --device cuda

Each model is a list of float32 tensors shaped like Linear layers. For each size the script times, over
the same tensors in the same run (median of --repeats): the fingerprints of all tensors (what one
ParamFreezeAssertion check costs, host synchronisation included), clone() of every tensor, and sum() of
every tensor; it prints their ratios, GB/s, and the extra memory the fingerprint needed.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default="10,100,1000", help="model sizes in MB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    name = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    )
    print(
        f"# ParamFreezeAssertion fingerprint benchmark: torch {torch.__version__}, device {args.device} ({name}), "
        f"{torch.get_num_threads()} CPU threads, median of {args.repeats}"
    )
    print(
        "| params | tensors | fingerprint ms | clone ms | sum ms | fp/clone | fp/sum | fp GB/s | clone GB/s "
        "| fp extra MB | clone extra MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for megabytes in (int(s) for s in args.sizes.split(",")):
        print(row(make_model(megabytes, args.device), args.device, args.repeats))


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
