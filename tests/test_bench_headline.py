"""BENCHMARKS.md's headline table is what bench/headline.py makes of the committed bench/results/*.json."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _headline():
    spec = importlib.util.spec_from_file_location("bench_headline", ROOT / "bench" / "headline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the module executes
    spec.loader.exec_module(module)
    return module


def _has_history() -> bool:
    """The dates come from git: a shallow clone (or an export without .git) cannot give them."""
    if shutil.which("git") is None:
        return False
    out = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == "false"


@pytest.mark.skipif(not _has_history(), reason="needs a git checkout with its history (the rows are dated by it)")
def test_the_headline_block_in_benchmarks_md_is_what_the_generator_makes_of_the_results():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "headline.py"), "--check"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_result_json_the_table_reads_exists_and_every_row_names_a_command():
    h = _headline()
    results = {p.name for p in (ROOT / "bench" / "results").glob("*.json")}
    for make in h.ROWS:
        row = make()
        assert set(row.sources) <= results, row.sources
        assert row.command.startswith("python bench/"), row.command


def test_a_difference_within_the_figures_own_noise_is_reported_as_none():
    h = _headline()
    # Repeats: overlapping ranges say nothing; separated ranges give the median ratio.
    assert h.ratio_of_repeats([3.0, 3.5, 4.0], [2.0, 3.1, 3.2]) == h.NO_DIFFERENCE
    assert h.ratio_of_repeats([3.4, 3.5, 3.6], [2.3, 2.5, 2.7]) == "1.40x"
    assert h.difference_of_repeats([1.83, 1.84], [1.86, 1.87], 3) == "−0.030"
    # One timing each: only beyond RUN_NOISE either way.
    assert h.ratio_of_single(1.1, 1.0) == h.NO_DIFFERENCE
    assert h.ratio_of_single(1.0, 1.1) == h.NO_DIFFERENCE
    assert h.ratio_of_single(2.0, 1.0) == "2.00x"
    # Accuracies: two binomial standard errors (4% of 50 is within them; 42% is not).
    assert h.accuracy_vs(0.04, 0.0, 50) == h.NO_DIFFERENCE
    assert h.accuracy_vs(0.42, 0.0, 50) == "+42.0 points"
    # Seeds against a seed-free bar: the bar inside the seeds' range says nothing.
    assert h.points_vs_bar([13.6, 14.2, 14.4], 14.0, 3.0) == h.NO_DIFFERENCE
    assert h.points_vs_bar([21.8], 49.0, 3.0) == "−27.20"


def test_splice_replaces_only_the_block_between_the_markers():
    h = _headline()
    text = f"# Title\n\nintro\n\n{h.START}\nold table\n{h.END}\n\n## Section\n"
    assert h.splice(text, f"{h.START}\nnew\n{h.END}") == f"# Title\n\nintro\n\n{h.START}\nnew\n{h.END}\n\n## Section\n"
    with pytest.raises(h.SourceError):
        h.splice("# no markers\n", "x")
