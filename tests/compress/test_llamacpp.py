"""llama.cpp itself judges our GGUF export (the `llamacpp` tier: `pip install 'lmforge[llamacpp]'`, which builds
llama.cpp from source, ~7 minutes on 2 cores, then `python -m pytest -m llamacpp`; figures in BENCHMARKS.md).

Two runs on the default corpus: the default recipe's model (150 steps instead of its 3-minute budget) and a Llama
preset with grouped-query attention and an untied head, each exported as f16, q8_0 and q4_0 and loaded in llama.cpp.
"""

from __future__ import annotations

import pytest

from lmforge.compress.gguf import export_gguf
from lmforge.config import load_train_config
from lmforge.loading import load_run
from lmforge.training.pretrain import train

llamacpp = pytest.importorskip("lmforge.compress.llamacpp")
pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

RUNS = {"default": [], "llama-tiny": ["model.preset=llama-tiny"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, args in RUNS.items():
        run_dir = tmp_path_factory.mktemp("runs") / name
        train(load_train_config("default", [f"out_dir={run_dir}", "train.max_steps=150", "train.eval_interval=150",
                                            "sample.num_samples=0", *args]), progress=False)
        out[name] = load_run(run_dir)
    return out


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("name", list(RUNS))
def test_llama_cpp_runs_our_gguf_as_lmforge_runs_the_model(runs, tmp_path, name, qtype):
    run = runs[name]
    path = export_gguf(run.model, run.tokenizer, tmp_path / "m.gguf", qtype)
    found = llamacpp.agreement(path, run.model, run.tokenizer)
    print(f"\n{name} {qtype}: {found.summary()}")
    # llama.cpp's own tokenizer (the GPT-2 pre-tokenizer regex, our merges) gives our ids, and nothing in the file
    # makes it warn (an unknown pre-tokenizer, a token type it overrides, an end-of-generation token it doubts).
    assert found.tokenizer_equal == found.texts >= 20, found.tokenizer_mismatches
    assert found.warnings == []
    if qtype == "f16":
        # F16 weights, and llama.cpp's F16 activations in its matrix products: measured 0.0061-0.0074 for the
        # default model (3-minute run), against our float32 model.
        assert found.max_logit_diff <= 1e-2
        assert found.greedy_identical == found.greedy_prompts, found.greedy_first_difference
    elif qtype == "q8_0":
        assert found.top1_agreement >= 0.95
    else:  # q4_0 rounds every weight to 16 levels: measured 85% top-1 against the float model; recorded only
        assert found.top1_agreement >= 0.5
