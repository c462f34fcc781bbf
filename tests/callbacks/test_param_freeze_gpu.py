"""GPU checks of ParamFreezeAssertion; skipped on machines without CUDA (CI runs on CPU only)."""

import warnings

import pytest
import torch
from digits import DigitsClassifier, DigitsDataModule
from helpers import small_trainer

from lightning_phases import ParameterChangedError, ParamFreezeAssertion
from lightning_phases.detectors.fingerprint import fingerprints

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_gpu_fingerprints_equal_cpu_fingerprints():
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3_000_001, generator=generator),
        torch.randn(7, generator=generator).half(),
        torch.randint(-5, 5, (13,), generator=generator),
        torch.randn(40, 50, generator=generator).t(),
    ]
    on_gpu = [t.cuda() for t in tensors]
    halves = torch.randn(11, dtype=torch.float16, generator=generator)
    tensors.append(halves[1:])  # views at an odd 2-byte offset: not 4-byte aligned
    on_gpu.append(halves.cuda()[1:])
    assert on_gpu[-1].data_ptr() % 4
    assert torch.equal(fingerprints(tensors), fingerprints(on_gpu))


def test_one_host_synchronisation_per_check():
    tensors = [torch.randn(n, device="cuda") for n in (5_000_000, 1000, 3, 77_777)]
    fingerprints(tensors)  # warm-up: caches the weight vector on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fingerprints(tensors)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


class OneUlpInTest(DigitsClassifier):
    def test_step(self, batch, batch_idx):
        if batch_idx == 1:
            with torch.no_grad():
                self.head.weight[3, 7] = torch.nextafter(self.head.weight[3, 7], torch.tensor(1e9, device=self.device))
        return super().test_step(batch, batch_idx)


def test_gpu_trainer_clean_fit_is_silent_and_one_ulp_in_test_raises(tmp_path):
    check = ParamFreezeAssertion(check_every_n_batches=2)
    checked = small_trainer([check], accelerator="gpu", devices=1, default_root_dir=tmp_path)
    model = OneUlpInTest()
    checked.fit(model, DigitsDataModule())
    assert check.events == []
    with pytest.raises(ParameterChangedError, match=r"head\.weight"):
        checked.test(model, DigitsDataModule(), verbose=False)


def test_fused_kernel_equals_the_blocked_torch_computation():
    from lightning_phases.detectors import _triton_fingerprint
    from lightning_phases.detectors.fingerprint import _blocked_sum

    generator = torch.Generator(device="cuda").manual_seed(0)
    for n in (1, 4095, 4096, 4097, 3 * 2**20 + 11, 50_000_000):
        words = torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, device="cuda", generator=generator)
        fused = _triton_fingerprint.weighted_sums(((words.data_ptr(), n),), words.device)
        assert torch.equal(fused[0], _blocked_sum(words)), n
    many = [
        torch.randint(-(2**31), 2**31 - 1, (n,), dtype=torch.int32, device="cuda", generator=generator)
        for n in (0, 5, 4096, 10_000, 123_457)
    ]
    expected = torch.stack([_blocked_sum(w) for w in many])
    spans = tuple((w.data_ptr(), w.numel()) for w in many)
    assert torch.equal(_triton_fingerprint.weighted_sums(spans, many[0].device), expected)
    assert torch.equal(_triton_fingerprint.weighted_sums(spans, many[0].device), expected)  # cached table
