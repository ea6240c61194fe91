import json

import torch

from lmforge import hardware
from lmforge.hardware import cached, machine_id, measure_gemm_flops


def test_the_gemm_measurement_shrinks_its_size_to_fit_the_time_budget(monkeypatch):
    sizes, randn = [], torch.randn
    monkeypatch.setattr(torch, "randn", lambda n, *a, **k: sizes.append(n) or randn(n, *a, **k))
    # A precision without a fast kernel (bf16 on a CPU with no bf16 units: 27 minutes at full size).
    assert measure_gemm_flops(torch.device("cpu"), torch.float32, budget_s=1e-6) > 0
    assert max(sizes) == 512
    sizes.clear()
    measure_gemm_flops(torch.device("cpu"), torch.float32, reps=1, budget_s=1e9)
    assert max(sizes) == 2048  # a kernel fast enough for the budget keeps the full size


def test_figures_are_measured_once_per_machine_and_kept_apart_by_thread_count(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    cpu, calls = torch.device("cpu"), []
    assert cached(cpu, "x", lambda: calls.append(1) or 1.5) == 1.5
    assert cached(cpu, "x", lambda: calls.append(1) or 9.0) == 1.5  # from the cache
    assert len(calls) == 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)  # another thread count is another machine
        assert cached(cpu, "x", lambda: 7.0) == 7.0
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads((tmp_path / hardware.CACHE_FILE).read_text())) == 2
    assert "threads" in machine_id(cpu) and torch.__version__ in machine_id(cpu)


def test_a_corrupt_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    (tmp_path / hardware.CACHE_FILE).write_text("[not a dict")
    assert cached(torch.device("cpu"), "y", lambda: 3.0) == 3.0
