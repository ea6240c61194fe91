"""`lmforge export` of every kind of run that is not a plain pretrained one (fine-tuned runs: tests/finetuning;
quantized: test_quantize.py), and the runs no other runtime can load."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from lmforge.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, find_chat_template
from lmforge.cli import main
from lmforge.compress import llamacpp
from lmforge.compress.gguf import read_gguf
from lmforge.compress.prune import PruneSpec, prune_run
from lmforge.loading import load_run


def test_a_structured_pruned_run_exports_with_its_smaller_intermediate_size(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    pruned = tmp_path / "pruned"
    prune_run(str(run_dir), str(pruned), PruneSpec("structured", 0.5), windows=2, calibration_windows=4,
              speed=False, progress=False)
    model = load_run(pruned).model
    hidden = model.cfg.intermediate_size
    assert hidden < load_run(run_dir).model.cfg.mlp_hidden
    assert main(["export", str(pruned), "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert hf.config.n_inner == hidden
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)[0]).abs().max() <= 1e-4  # fp32 on both sides: a few ULPs
    path = tmp_path / "m.gguf"
    assert main(["export", str(pruned), "--format", "gguf", "--type", "q8_0", "--out", str(path)]) == 0
    meta, tensors = read_gguf(path)
    assert meta["gpt2.feed_forward_length"] == hidden and tensors["blocks.0.mlp.fc.weight"].shape == (hidden, 64)


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_a_run_no_runtime_can_load_is_refused_naming_the_missing_key_and_a_preset(run_dir, tmp_path, capsys, fmt):
    custom = tmp_path / "custom"
    shutil.copytree(run_dir, custom)
    config = yaml.safe_load((custom / "config.yaml").read_text())
    config["model"]["qk_norm"] = True  # no weights of its own: the checkpoint still loads
    (custom / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))  # the preset stays first
    out = tmp_path / "out"
    assert main(["export", str(custom), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "qk_norm=true is neither GPT-2" in err[0]
    assert "to be GPT-2 it needs model.qk_norm=false, which preset gpt2-mini has" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom"]  # nothing written, no temporary left


class _Prompted(Exception):
    """What llama-cpp-python's chat handler would complete: the prompt's token ids."""


def test_a_run_without_a_chat_template_exports_lmforge_s_default_into_the_gguf(run_dir, tmp_path, monkeypatch):
    assert find_chat_template(run_dir) is None
    monkeypatch.setattr(llamacpp, "available", lambda: False)  # the report's llama.cpp figures: test_report.py
    path = tmp_path / "m.gguf"
    assert main(["export", str(run_dir), "--format", "gguf", "--out", str(path)]) == 0
    assert read_gguf(path)[0]["tokenizer.chat_template"] == DEFAULT_CHAT_TEMPLATE
    llama_cpp = pytest.importorskip("llama_cpp")
    # /v1/chat/completions in llama-cpp-python formats the conversation as `lmforge serve` does: the same ids.
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.chat_format == "chat_template.default"  # the file's template, not a fallback (llama-2)

    def prompted(prompt: list[int], **_) -> None:
        raise _Prompted(prompt)

    llm.create_completion = prompted
    messages = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "Sum a list?"},
                {"role": "assistant", "content": "sum(xs)"}, {"role": "user", "content": "And its mean?"}]
    with pytest.raises(_Prompted) as sent:
        llm.create_chat_completion(messages=messages, max_tokens=1)
    run = load_run(run_dir)
    served = ChatTemplate.resolve(None, run.folder, run.tokenizer)  # what `lmforge serve` picks for the run
    text = served.render(messages, add_generation_prompt=True)
    assert sent.value.args[0] == run.tokenizer.encode(text, allow_special=True)
    assert run.tokenizer.eot_id in sent.value.args[0]  # the assistant's turn ends with end-of-text, a special token
