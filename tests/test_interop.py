"""Hugging Face model folders in and out (lmforge.interop): import, direct loading, export, sharded
weights, bad folders; round trips checked against `transformers` itself on tiny random models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.cli import main  # noqa: E402
from lmforge.data.tokenizer import Tokenizer  # noqa: E402
from lmforge.interop import load_hf  # noqa: E402
from lmforge.run import load_run  # noqa: E402
from lmforge.rundir import read_run_info  # noqa: E402
from tests.fixtures import hf_gpt2, hf_llama, save_hf_folder  # noqa: E402

MODELS = {"gpt2-tied": lambda: hf_gpt2(True), "llama-gqa": lambda: hf_llama(False)}


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-gqa"])
def test_folder_import_then_export_round_trips_through_transformers(name, tmp_path):
    tok = Tokenizer.train_char(["the quick brown fox jumps over the lazy dog, THE END.\n"])
    hf = MODELS[name]()
    hf.resize_token_embeddings(tok.vocab_size)
    src = tmp_path / "src"
    save_hf_folder(hf, src, tok)
    idx = torch.tensor([tok.encode("the lazy fox ")])
    with torch.no_grad():
        ref = hf(idx).logits
        # Directly, wherever a run is accepted, and through `lmforge import`.
        assert (load_run(src).model(idx)[0] - ref).abs().max() <= 1e-4
        assert main(["import", str(src), "--out", str(tmp_path / "run")]) == 0
        run = load_run(tmp_path / "run")
        assert (run.model(idx)[0] - ref).abs().max() <= 1e-4
        info = json.loads((tmp_path / "run" / "run.json").read_text())
        assert (info["kind"], info["task"], info["lora"]) == ("imported", "lm", False)
        # An import written before run.json existed is recognised as one.
        shutil.copytree(tmp_path / "run", tmp_path / "old")
        (tmp_path / "old" / "run.json").unlink()
        with pytest.warns(UserWarning, match="no run.json"):
            assert read_run_info(tmp_path / "old").kind == "imported"
        assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
        assert (back(idx).logits - ref).abs().max() <= 1e-4
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "back")("fox").input_ids == tok.encode("fox")


def test_sharded_weights_and_bad_folders(tmp_path, capsys):
    tok = Tokenizer.train_char(["abc"])
    hf = hf_llama()
    hf.resize_token_embeddings(101)
    hf.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    idx = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        assert (load_hf(tmp_path / "sharded")[0](idx)[0] - hf(idx).logits).abs().max() <= 1e-4
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    tok.save(bert / "tokenizer.json")
    assert main(["import", str(bert), "--out", str(tmp_path / "x")]) == 2
    assert "unsupported Hugging Face model_type 'bert'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
