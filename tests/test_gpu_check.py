"""bench/gpu_check.py, the script a lent GPU runs, in its dry mode (the CPU, tiny shapes): every part runs and its
figures are sane, so the script cannot rot between GPU loans. With or without a GPU here, the test runs the dry mode."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"
PARTS = ["train", "mfu", "parallel", "generate", "serve", "quantize"]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the module executes
    spec.loader.exec_module(module)
    return module


def test_the_dry_run_passes_every_part_with_sane_figures(tmp_path):
    out = tmp_path / "x.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out), "--work", str(tmp_path / "w")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "dry" and report["device"]["type"] == "cpu"
    assert list(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("traceback"))
        assert part["seconds"] > 0  # (its budget is a hang guard: a part past it fails, and the status says so)
    fig = {name: part["figures"] for name, part in report["parts"].items()}

    train = fig["train"]
    assert train["skipped"] == [5]  # the NaN step, and only it, and the run went on to its last step
    assert train["steps"] == 16 and math.isfinite(train["final_loss"]) and train["final_loss"] < train["first_loss"]
    assert train["tokens_per_s"] > 0 and train["guard_on_device"] and train["flash_ok"]
    assert any("flash" in k for k in train["sdpa_kernels"])

    assert fig["mfu"]["tokens_per_s"] > 0 and 0 < fig["mfu"]["mfu"] < 1
    for run in ("ddp", "fsdp", "fsdp_muon"):
        assert 0 <= fig["parallel"][f"{run}_max_rel_diff"] <= 1e-3
    assert fig["generate"]["cache_equals_no_cache"] and fig["generate"]["tokens_per_s_b1"] > 0
    serve = fig["serve"]
    assert serve["equals_alone"] and serve["peak_batch"] == serve["requests"] >= 8 and serve["tokens_per_s"] > 0
    quant = fig["quantize"]
    assert all(quant[f"{m}_tokens_per_s"] > 0 for m in ("float", "int8", "int4"))
    assert 0.9 < quant["int8_ppl_ratio"] <= 1.05 and 0.9 < quant["int4_ppl_ratio"] <= 1.25

    table = out.with_suffix(".md").read_text()
    assert all(f"| {name} | ok |" in table for name in PARTS)
    assert table in done.stdout


def test_a_command_line_that_cannot_run_exits_2_before_any_work(capsys):
    gpu_check = _gpu_check()
    assert gpu_check.main(["--dry", "--parts", "train,nope"]) == 2
    assert "unknown part(s) ['nope']" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert gpu_check.main(["--parts", "train"]) == 2
        assert "--dry" in capsys.readouterr().err


def test_a_failing_or_overrunning_part_is_recorded_with_its_error_and_the_next_part_runs(tmp_path, monkeypatch):
    gpu_check = _gpu_check()

    def fails(ctx, figures):
        figures["before"] = 1.0
        raise ValueError("boom")

    def overruns(ctx, figures):
        while True:
            sum(range(1000))

    def passes(ctx, figures):
        figures["x"] = 2.0

    for name, run in (("fails", fails), ("overruns", overruns), ("passes", passes)):
        monkeypatch.setitem(gpu_check.PARTS, name, gpu_check.Part(run, ("before", "x")))
    monkeypatch.setattr(gpu_check, "DRY", dataclasses.replace(gpu_check.DRY, budgets={"fails": 5, "overruns": 0.2,
                                                                                     "passes": 5}))
    out = tmp_path / "x.json"
    threads = torch.get_num_threads()
    try:
        assert gpu_check.main(["--dry", "--parts", "fails,overruns,passes", "--out", str(out)]) == 1
    finally:
        torch.set_num_threads(threads)  # the dry run's one thread, not this process's for the tests after this one
    parts = json.loads(out.read_text())["parts"]
    assert parts["fails"]["status"] == "failed" and parts["fails"]["error"] == "ValueError: boom"
    assert "raise ValueError" in parts["fails"]["traceback"] and parts["fails"]["figures"] == {"before": 1.0}
    assert parts["overruns"]["status"] == "failed" and "past its budget" in parts["overruns"]["error"]
    assert parts["passes"] == {**parts["passes"], "status": "ok", "figures": {"x": 2.0}}
    assert "| fails | failed: ValueError: boom |" in out.with_suffix(".md").read_text()
