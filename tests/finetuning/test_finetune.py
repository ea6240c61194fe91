"""`lmforge finetune` end to end on a small pretrained base: SFT learns a format, classification
beats the majority class, LoRA runs load merged or not, and a killed LoRA run resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import __version__
from lmforge.cli import main
from lmforge.config import load_finetune_config
from lmforge.finetuning.finetune import finetune
from lmforge.loading import load_run
from lmforge.rundir import RunInfo, read_run_info, write_manifest
from tests.fixtures import HANG_S, LOSS_RTOL, finished_output, sigkill_after, train_losses

SFT = ["train.max_steps=300", "train.batch_size=16", "optim.lr=1e-3", "train.log_interval=50",
       "train.eval_interval=150"]


def _evals(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "eval"]


def test_sft_answers_held_out_prompts_of_the_learned_format(base_run, repeat_task, tmp_path):
    train_file, val_file = repeat_task
    cfg = load_finetune_config(None, [f"base={base_run}", f"data.train={train_file}", f"data.val={val_file}",
                                      f"out_dir={tmp_path / 'sft'}", *SFT])
    result = finetune(cfg, progress=False)
    before = _evals(result.run_dir)[0]
    assert before["step"] == 0 and before["exact_match"] == 0.0
    assert result.metrics["exact_match"] >= 0.2  # 0.34 when measured; the words were never trained on
    assert result.metrics["val_loss"] < before["val_loss"] / 3
    saved = json.loads((result.run_dir / "final_eval.json").read_text())
    assert saved["exact_match"] == result.metrics["exact_match"] and saved["samples"]
    assert json.loads((result.run_dir / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"

    # Exported, the chat model keeps its template: transformers renders prompts the way we trained.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate

    out = tmp_path / "hf"
    subprocess.run([sys.executable, "-m", "lmforge", "export", str(result.run_dir), "--out", str(out)], check=True)
    hf_tok = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "Repeat: word"}]
    ours = ChatTemplate(DEFAULT_CHAT_TEMPLATE, load_run(result.run_dir).tokenizer).render(chat, True)
    assert hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == ours
    ids = hf_tok(ours, return_tensors="pt").input_ids
    hf_answer = AutoModelForCausalLM.from_pretrained(out).generate(ids, max_new_tokens=12, do_sample=False)
    from lmforge.generate import generate

    ours_answer = generate(load_run(result.run_dir).model, [ids[0].tolist()], 12, temperature=0.0,
                           stop_ids=[hf_tok.eos_token_id])
    assert hf_answer[0, ids.shape[1]:].tolist()[:len(ours_answer[0])] == ours_answer[0]


def test_classification_beats_the_majority_class(base_run, module_snippets, tmp_path, capsys):
    cfg = load_finetune_config(None, ["task=classify", f"base={base_run}", f"data.train={module_snippets}",
                                      f"out_dir={tmp_path / 'cls'}", "train.max_steps=200", "train.batch_size=16",
                                      "optim.lr=1e-3", "train.eval_interval=100"])
    result = finetune(cfg, progress=False)
    m = result.metrics
    labels = json.loads((result.run_dir / "labels.json").read_text())
    matrix = torch.tensor(m["confusion_matrix"])
    majority = matrix.sum(1).max().item() / matrix.sum().item()
    assert m["val_accuracy"] >= majority + 0.1, (m["val_accuracy"], majority)
    assert m["val_macro_f1"] > 0.3
    assert labels == ["argparse", "calendar", "difflib", "tarfile"]
    run = load_run(result.run_dir)
    assert run.task == "classify" and run.labels == labels
    assert read_run_info(result.run_dir) == RunInfo("finetune", "classify", lora=False, version=__version__,
                                                    created=read_run_info(result.run_dir).created)

    # A run written before run.json existed still loads, as what it is (inferred once, with a warning).
    old = tmp_path / "old-layout"
    shutil.copytree(result.run_dir, old)
    (old / "run.json").unlink()
    with pytest.warns(UserWarning, match="no run.json"):
        old_run = load_run(old)
    assert old_run.task == "classify" and old_run.labels == labels
    x = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(old_run.model(x, torch.tensor([3])), run.model(x, torch.tensor([3])))

    # `lmforge eval --classify` on labelled texts reports the same kind of figures.
    from lmforge.evaluate.runner import EvalRequest, evaluate_run

    subset = tmp_path / "subset.csv"
    subset.write_text("".join(module_snippets.read_text().splitlines(keepends=True)[:1])
                      + "".join(f'"{t}",{label}\n' for t, label in (("import argparse", "argparse"),
                                                                      ("import tarfile", "tarfile"))))
    report = evaluate_run(str(result.run_dir), EvalRequest(classify=str(subset)), device="cpu", progress=False)
    res = report["results"]["classify"]
    assert res["examples"] == 2 and res["labels"] == labels and len(res["data_sha256"]) == 64
    assert sum(map(sum, res["confusion_matrix"])) == 2 and 0.0 <= res["accuracy"] <= 1.0

    # Exported, it is its fine-tuned transformer as a causal LM, and says that the label head stayed behind.
    from transformers import AutoModelForCausalLM

    capsys.readouterr()
    assert main(["export", str(result.run_dir), "--out", str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert "is a classification run: its label head (4 labels) is not a causal LM" in err
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(x).logits
        assert (theirs - run.model.backbone(x)[0]).abs().max() <= 1e-4  # fp32 on both sides: a few ULPs


def test_a_lora_run_loads_the_same_from_adapters_as_from_merged_weights(base_run, repeat_task, tmp_path):
    train_file, _ = repeat_task
    cfg = load_finetune_config(None, [f"base={base_run}", f"data.train={train_file}", f"out_dir={tmp_path / 'lora'}",
                                      "lora.rank=4", "lora.merge=true", "train.max_steps=40", "optim.lr=3e-3",
                                      "data.eval_generations=0", "dropout=0.1"])
    result = finetune(cfg, progress=False)
    assert read_run_info(result.run_dir).lora
    assert load_run(result.run_dir).config.model.dropout == 0.1  # honoured, and saved with the run
    assert load_run(base_run).config.model.dropout == 0.0
    ckpt = result.run_dir / "checkpoints" / "step_000040"
    assert (ckpt / "adapter.safetensors").is_file() and (ckpt / "model.safetensors").is_file()
    adapters_only = tmp_path / "adapters_only"
    shutil.copytree(result.run_dir, adapters_only)
    (adapters_only / "checkpoints" / "step_000040" / "model.safetensors").unlink()
    write_manifest(adapters_only / "checkpoints" / "step_000040")  # as a run without --merge writes it
    x = torch.arange(1, 40)[None]
    with torch.no_grad():
        merged = load_run(result.run_dir).model(x)[0]
        from_adapters = load_run(adapters_only).model(x)[0]
        base = load_run(base_run).model(x)[0]
    torch.testing.assert_close(from_adapters, merged, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged, base, atol=1e-3)
    # Exported from its adapters alone, the merged model is what transformers runs.
    from transformers import AutoModelForCausalLM

    assert main(["export", str(adapters_only), "--out", str(tmp_path / "hf")]) == 0
    with torch.no_grad():
        assert (AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(x).logits - merged).abs().max() <= 1e-4


def _finetune(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmforge", "finetune", *args],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_a_killed_lora_run_resumes_exactly(base_run, repeat_task, tmp_path):
    train_file, _ = repeat_task
    args = [f"base={base_run}", f"data.train={train_file}", "lora.rank=4", "lora.dropout=0.1",
            "train.max_steps=50", "train.batch_size=8", "train.log_interval=1", "train.ckpt_interval=10",
            "train.eval_interval=25", "data.eval_generations=0", "train.precision=fp32"]
    # fp32, not auto: the reference and the killed run time bf16 against fp32 at once, and may choose differently.
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    ref = _finetune([*args, f"out_dir={ref_dir}"])
    proc = _finetune([*args, f"out_dir={killed_dir}"])
    sigkill_after(proc, killed_dir / "metrics.jsonl", 15)
    assert 10 <= max(train_losses(killed_dir)) < 50
    assert "resuming from" in finished_output(_finetune(["--resume", str(killed_dir)]))
    finished_output(ref)
    ref_losses, resumed_losses = train_losses(ref_dir), train_losses(killed_dir)
    assert sorted(resumed_losses) == list(range(1, 51))
    assert resumed_losses == ref_losses


@pytest.mark.slow
def test_lora_sft_on_two_ddp_processes_trains_what_one_process_trains(base_run, repeat_task, tmp_path):
    train_file, val_file = repeat_task
    args = [f"base={base_run}", f"data.train={train_file}", f"data.val={val_file}", "lora.rank=4", "lora.dropout=0",
            "dropout=0", "train.max_steps=20", "train.batch_size=8", "train.global_batch_size=16",
            "train.log_interval=1", "train.eval_interval=20", "train.precision=fp32", "train.device=cpu",
            "data.eval_generations=0"]
    one = _finetune([*args, f"out_dir={tmp_path / 'one'}"])
    finished_output(one)
    finished_output(_finetune([*args, f"out_dir={tmp_path / 'two'}", "--nproc", "2"]))
    ref, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 21))
    assert all(abs(two[s] - ref[s]) <= LOSS_RTOL * abs(ref[s]) for s in ref)


def _fails_with(args: list[str], *fragments: str) -> None:
    result = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_user_mistakes_are_one_line_errors(base_run, repeat_task, module_snippets, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a", "respons": "b"}\n')
    _fails_with(["finetune", f"base={base_run}", f"data.train={bad}", f"out_dir={tmp_path / 'x'}"],
                "bad.jsonl:2", "missing field 'response'", "--skip-bad-lines")
    _fails_with(["finetune", f"base={tmp_path / 'nowhere'}", f"data.train={bad}"], "nowhere", "does not exist")
    _fails_with(["finetune", f"data.train={bad}"], "base=")
    assert not (tmp_path / "x").exists()  # nothing written for a run that could not start


def test_lora_sft_from_a_hugging_face_folder_uses_its_own_chat_template(tmp_path, capsys):
    from lmforge.data.tokenizer import Tokenizer
    from tests.fixtures import hf_llama, save_hf_folder

    tok = Tokenizer.train_char(["Repeat: abcdefghijklmnopqrstuvwxyz <|>_\n"])
    tok.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok = Tokenizer(tok.hf)  # recount the vocabulary
    hf = hf_llama()
    hf.resize_token_embeddings(tok.vocab_size)
    src = tmp_path / "hf"
    save_hf_folder(hf, src, tok)
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "<|im_end|>"}))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Repeat: {w}"},
                                                     {"role": "assistant", "content": w}]}) + "\n"
                            for w in ("abc", "xyz", "hello", "quiz", "jump", "fox") * 4))
    cfg = load_finetune_config(None, [f"base={src}", f"data.train={data}", f"out_dir={tmp_path / 'run'}",
                                      "lora.rank=4", "train.max_steps=10", "train.batch_size=4"])
    result = finetune(cfg)
    assert "chat template: own" in capsys.readouterr().out
    assert json.loads((result.run_dir / "tokenizer_config.json").read_text()) == {
        "chat_template": template, "eos_token": "<|im_end|>"}
    run = load_run(result.run_dir)  # base weights from the HF folder + the adapters
    assert torch.isfinite(run.model(torch.tensor([[1, 2, 3]]))[0]).all()
