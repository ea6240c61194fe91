"""Hugging Face model folders in and out (lmforge.interop): import, direct loading, export, sharded
weights, bad and untrusted folders (custom code, pickles); round trips checked against `transformers`
itself on tiny random models."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge import interop  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.data.tokenizer import Tokenizer  # noqa: E402
from lmforge.errors import UserError  # noqa: E402
from lmforge.interop import load_hf  # noqa: E402
from lmforge.loading import load_run  # noqa: E402
from lmforge.rundir import read_run_info  # noqa: E402
from tests.fixtures import HANG_S, hf_gpt2, hf_llama, save_hf_folder  # noqa: E402

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
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text('{"model_type": "t5"}')
    tok.save(t5 / "tokenizer.json")
    assert main(["import", str(t5), "--out", str(tmp_path / "x")]) == 2
    assert "unsupported Hugging Face model_type 't5'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("change", "expected"), [
    ({"n_layer": "x"}, "cannot read it .*'n_layer'"), ({"n_head": 3}, "divisible by model.n_head=3"),
    ({"n_layer": 0}, "model.n_layer must be positive"), ({"n_positions": 10**9}, "model.block_size.*at most"),
    ({"vocab_size": 10}, "do not fit its config.json: size mismatch")])
def test_a_config_json_with_values_that_cannot_work_is_one_line_naming_it(change, expected, tmp_path, capsys):
    folder = tmp_path / "hf"
    save_hf_folder(hf_gpt2(), folder, Tokenizer.train_char(["abc"]))
    (folder / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **change}))
    capsys.readouterr()  # (save_pretrained's progress bar)
    assert main(["import", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert re.search(f"'{re.escape(str(folder))}.*{expected}", _one_error_line(capsys))
    assert not (tmp_path / "out").exists()


# Untrusted folders: a model folder is data. Its Python (auto_map) is never imported, its pickles are
# never loaded; each planted file below would create MARKER if anything ran it.

def _evil_code(marker) -> str:
    return f"open({str(marker)!r}, 'w').close()\n"


class _Evil:
    """Pickled, it is a call to open(MARKER, 'w'): unpickling it would create the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _gpt2_folder(folder, marker):
    """A valid tiny GPT-2 folder (it would load), with Python files next to its config.json."""
    save_hf_folder(hf_gpt2(), folder, Tokenizer.train_char(["abc"]))
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(_evil_code(marker))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


CUSTOM_CODE = {
    "config-custom-type": ("config.json", {"model_type": "evil", "auto_map": {
        "AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}),
    "config-gpt2": ("config.json", {"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}),
    "tokenizer-config": ("tokenizer_config.json", {"tokenizer_class": "EvilTokenizer", "auto_map": {
        "AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}),
}


@pytest.mark.parametrize("case", CUSTOM_CODE)
def test_a_folder_asking_to_run_its_code_is_refused_without_running_it(case, tmp_path, capsys):
    marker, src, out = tmp_path / "MARKER", tmp_path / "evil", tmp_path / "out"
    _gpt2_folder(src, marker)
    name, extra = CUSTOM_CODE[case]
    path = src / name
    path.write_text(json.dumps({**(json.loads(path.read_text()) if path.is_file() else {}), **extra}))
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["import", str(src), "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert f"'{path}' asks to run custom code (auto_map: " in err and "_evil.py" in err
    assert "lmforge never runs a model folder's code; supported: gpt2, llama, mistral, qwen2" in err
    with pytest.raises(UserError, match="auto_map"):  # direct loading, and fine-tuning from the folder
        load_run(src)
    assert not marker.exists() and not out.exists()


def test_the_command_refuses_custom_code_without_a_prompt(tmp_path):
    marker, src, out = tmp_path / "MARKER", tmp_path / "evil", tmp_path / "out"
    _gpt2_folder(src, marker)
    (src / "config.json").write_text(json.dumps(CUSTOM_CODE["config-custom-type"][1]))
    proc = subprocess.run([sys.executable, "-m", "lmforge", "import", str(src), "--out", str(out)], input="",
                          capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 2, proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "asks to run custom code (auto_map" in proc.stderr
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("name,pickled", [("pytorch_model.bin", False), ("pytorch_model.bin", True),
                                          ("model.ckpt", True)])
def test_pickled_weights_are_refused_never_loaded(name, pickled, tmp_path, capsys):
    marker, src, out = tmp_path / "MARKER", tmp_path / "src", tmp_path / "out"
    _gpt2_folder(src, marker)
    (src / "model.safetensors").unlink()
    if pickled:
        torch.save({"transformer.wte.weight": _Evil(marker)}, src / name)
    else:
        (src / name).write_bytes(b"\x80\x02not really a checkpoint")
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["import", str(src), "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert f"found only pickled weights: {name}" in err and "only safetensors weights are read" in err
    with pytest.raises(UserError, match="never pickles"):
        load_run(src)
    # An index that lists a pickle as a shard is refused too.
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": name}}))
    assert main(["import", str(src), "--out", str(out)]) == 2
    assert f"lists '{name}', which is no safetensors file" in _one_error_line(capsys)
    assert not marker.exists() and not out.exists()


def _hf_bart():
    """A tiny random transformers BartForConditionalGeneration (vocabulary 101)."""
    cfg = transformers.BartConfig(vocab_size=101, d_model=32, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                  decoder_ffn_dim=64, max_position_embeddings=32)
    return transformers.BartForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize(("hf_model", "auto"), [(hf_gpt2, "AutoModelForCausalLM"), (_hf_bart, "AutoModelForSeq2SeqLM")],
                         ids=["gpt2", "bart"])
def test_a_hub_id_is_loaded_without_its_code_and_from_safetensors_only(hf_model, auto, monkeypatch):
    tok, calls, hf = Tokenizer.train_char(["abc"]), [], hf_model()

    def config(name, **kw):
        calls.append(("config", name, kw))
        return hf.config

    def model(name, **kw):
        calls.append(("model", name, kw))
        return hf

    def tokenizer(name, **kw):
        calls.append(("tokenizer", name, kw))
        return types.SimpleNamespace(backend_tokenizer=tok.hf)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", config)
    monkeypatch.setattr(getattr(transformers, auto), "from_pretrained", model)  # the class its config says it is
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", lambda url, **kw: None)  # the hub answers, offline
    loaded, loaded_tok = load_hf("some-org/tiny-model")
    assert loaded.cfg.vocab_size == 101 and loaded_tok.vocab_size == tok.vocab_size
    assert [(what, name) for what, name, _ in calls] == [("config", "some-org/tiny-model"),
                                                         ("model", "some-org/tiny-model"),
                                                         ("tokenizer", "some-org/tiny-model")]
    assert all(kw["trust_remote_code"] is False for _, _, kw in calls) and calls[1][2]["use_safetensors"] is True


@pytest.mark.parametrize("no_answer", [ConnectionError("[Errno -2] Name or service not known"),
                                       TimeoutError("timed out"), "offline"], ids=["no-dns", "timeout", "offline"])
def test_a_hub_id_without_a_network_fails_in_seconds_with_one_line_saying_to_pass_a_folder(no_answer, monkeypatch,
                                                                                            tmp_path, capsys):
    import time

    from huggingface_hub.errors import OfflineModeIsEnabled

    def hub(url, **kw):  # one question, as lmforge asks it: never a retry, never the network in this test
        asked.append(kw.get("timeout"))
        raise OfflineModeIsEnabled("HF_HUB_OFFLINE=1") if no_answer == "offline" else no_answer

    def transformers_is_not_asked(*args, **kw):  # it would retry with back-off for about a minute
        raise AssertionError("from_pretrained was called")

    asked, slept = [], []
    monkeypatch.setattr(time, "sleep", slept.append)  # a back-off would sleep
    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", hub)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", transformers_is_not_asked)
    assert main(["import", "gpt2", "--out", str(tmp_path / "run")]) == 2
    # In seconds, by what is done rather than by the clock: one question with a 5 s timeout, no sleep, no retry.
    assert asked == [5.0] and slept == []
    assert _one_error_line(capsys) == (
        "lmforge import: error: 'gpt2' is not a local folder and the Hugging Face hub cannot be reached (no network?): "
        "pass a folder saved with save_pretrained, e.g. made by `lmforge export`")
    assert not (tmp_path / "run").exists()


def test_a_path_that_is_neither_a_folder_nor_a_hub_id_is_one_line_without_asking_the_hub(monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.get_hf_file_metadata", lambda url, **kw: pytest.fail("the hub was asked"))
    with pytest.raises(UserError, match=r"^'no/such/folder' is no local folder \(it does not exist\) and no hub id"):
        load_hf("no/such/folder")


def test_an_export_onto_a_full_disk_is_one_line_leaves_nothing_and_the_retry_succeeds(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    save_hf_folder(hf_gpt2(), src, Tokenizer.train_char(["abc"]))
    ended = subprocess.Popen(["true"])
    ended.wait()
    killed = tmp_path / f".out.tmp{ended.pid}"  # what an export killed mid-write left: removed by the next one
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    running = tmp_path / f".out.tmp{os.getppid()}"  # a running export's: left alone
    running.mkdir()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    capsys.readouterr()
    with monkeypatch.context() as m:  # the weights are written, then the disk is full
        m.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", full_disk)
        assert main(["export", str(src), "--format", "hf", "--out", str(out)]) == 1
    err = capsys.readouterr().err  # transformers' progress bar ("Writing model shards"), then the one line
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err and line.startswith("lmforge export: error: ")
    assert f"exporting to '{out}' failed: No space left on device (" in line and " free); nothing was written" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [running.name, "src"]
    assert main(["export", str(src), "--format", "hf", "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}


def test_an_import_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    src, out = tmp_path / "src", tmp_path / "run"
    save_hf_folder(hf_gpt2(), src, Tokenizer.train_char(["abc"]))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    capsys.readouterr()
    with monkeypatch.context() as m:  # config.yaml and tokenizer.json are written, then the disk is full
        m.setattr(interop, "save_weights_only", full_disk)
        assert main(["import", str(src), "--out", str(out)]) == 1
    assert f"importing into '{out}' failed: No space left on device" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    assert main(["import", str(src), "--out", str(out)]) == 0
    assert read_run_info(out).kind == "imported"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_an_export_past_a_real_file_size_limit_is_one_line_exit_1_and_leaves_nothing(fmt, tmp_path):
    import resource

    src, hf = tmp_path / "src", hf_gpt2()
    tok = Tokenizer.train_bpe(["the quick brown fox jumps over the lazy dog"], 300)
    hf.resize_token_embeddings(tok.vocab_size)  # byte-level BPE: GGUF export writes no other vocabulary
    save_hf_folder(hf, src, tok)
    out = tmp_path / ("out.gguf" if fmt == "gguf" else "out")

    def limit() -> None:  # a write past the limit fails with EFBIG (Python ignores SIGXFSZ), as a full disk would
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    done = subprocess.run([sys.executable, "-m", "lmforge", "export", str(src), "--format", fmt, "--out", str(out)],
                          capture_output=True, text=True, timeout=HANG_S, preexec_fn=limit)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    # (EFBIG, or numpy's short write "N requested and M written" for GGUF's tensor data)
    assert f"'{out}' failed: " in last and " free)" in last, last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_the_default_recipes_model_goes_to_transformers_and_comes_back_with_identical_weights(tmp_path):
    """`lmforge train`'s own architecture (the default recipe's model section, random weights)."""
    from lmforge.config import load_train_config
    from lmforge.model.gpt import GPT

    tok = Tokenizer.train_char(["def main():\n    return 'the default corpus is Python'\n"])
    cfg = load_train_config("default").model
    cfg.vocab_size = tok.vocab_size
    assert cfg.family == "llama-style: rope, rmsnorm, swiglu"
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    interop.export_hf(model, tok, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.model_type == "llama" and hf.config.tie_word_embeddings == cfg.tie_embeddings
    idx = torch.randint(0, tok.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # fp32 on both sides; measured 0.0 here (same kernels, same order), so 1e-4 is room for other CPUs' kernels.
        assert (hf(idx).logits - model(idx)[0]).abs().max() <= 1e-4
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    back = load_run(tmp_path / "run").model.state_dict()
    ours = model.state_dict()
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
