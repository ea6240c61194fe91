"""The `lmforge` command end to end, in subprocesses: a short training run and its artefacts,
generation from the run, and user mistakes -> one line on stderr, exit 2, nothing overwritten."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN = ["model.preset=llama-tiny", "model.n_layer=2", "model.block_size=64", "train.batch_size=16",
         "train.max_steps=150", "train.log_interval=10", "train.eval_interval=50", "train.eval_batches=4",
         "train.ckpt_interval=100", "optim.lr=3e-3", "optim.warmup_steps=10", "sample.num_samples=1",
         "sample.max_new_tokens=20"]  # Llama's blocks (GQA, untied head): it exports


def lmforge(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    import argparse
    import textwrap

    folder = tmp_path_factory.mktemp("corpus")
    for mod in (argparse, textwrap, json):
        (folder / Path(mod.__file__).name).write_text(Path(mod.__file__).read_text())
    (folder / "blob.bin").write_bytes(b"\x00\x01binary" * 100)
    return folder


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("runs") / "run"
    result = lmforge("train", f"data.sources=[{corpus}]", "data.tokenizer=char", f"out_dir={out}", *TRAIN)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


def test_training_lowers_the_loss_and_writes_every_artefact(trained_run):
    run, result = trained_run
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in evals] == [50, 100, 150]
    assert evals[-1]["val_loss"] < 2.6 < train[0]["loss"]  # ln(vocab ~ 90) = 4.5 at the start
    assert evals[-1]["val_bpb"] > 0 and all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in train)
    for name in ("run.json", "config.yaml", "tokenizer.json", "dataset_meta.json", "loss.png", "data/train.bin"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    assert (info["kind"], info["task"], info["lora"]) == ("pretrain", "lm", False) and info["version"]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step_000100", "step_000150"]
    assert (run / "checkpoints" / "latest").read_text() == "step_000150"
    assert "MFU" in result.stdout and "ETA" in result.stdout and "--- sample 1 ---" in result.stdout
    assert "binary" in result.stdout.lower()  # the prepare summary counts the skipped binary file
    # No silent phase, and the last lines say where everything is and what to run next.
    assert "step 150: final evaluation over the whole val split ..." in result.stdout
    assert f"checkpoint {run / 'checkpoints' / 'step_000150'} | loss curve {run / 'loss.png'}" in result.stdout
    assert f"next: lmforge generate {run} -p TEXT  |  lmforge eval {run}  |  lmforge export {run}" in result.stdout


def test_generate_from_run_is_deterministic_when_greedy(trained_run):
    run, _ = trained_run
    a = lmforge("generate", str(run), "--prompt", "def ", "-n", "30", "-t", "0")
    b = lmforge("generate", str(run / "checkpoints" / "step_000150"), "--prompt", "def ", "-n", "30", "-t", "0")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and len(a.stdout.strip()) > 5
    batch = lmforge("generate", str(run), "-p", "import ", "-p", "class X", "-n", "10", "-t", "0")
    # two texts, each followed by a "----" line (the model may write dashes of its own: argparse's source has them)
    assert batch.returncode == 0 and batch.stdout.splitlines().count("----") == 2


def test_a_run_written_before_run_json_existed_still_loads(trained_run, tmp_path):
    import torch

    from lmforge.loading import load_run
    from lmforge.rundir import read_run_info

    run, _ = trained_run
    old = tmp_path / "old-layout"
    shutil.copytree(run, old)
    (old / "run.json").unlink()
    with pytest.warns(UserWarning, match="no run.json .* kind=pretrain, task=lm"):
        assert read_run_info(old).kind == "pretrain"
    with pytest.warns(UserWarning, match="no run.json"):
        old_run = load_run(old)
    x = torch.arange(1, 30)[None]
    with torch.no_grad():
        assert torch.equal(old_run.model(x)[0], load_run(run).model(x)[0])


def test_train_twice_never_overwrites(trained_run, corpus):
    run, _ = trained_run
    before = (run / "config.yaml").read_text()
    result = lmforge("train", f"data.sources=[{corpus}]", "data.tokenizer=char", f"out_dir={run}", *TRAIN[:4],
                     "train.max_steps=2", "sample.num_samples=0")
    assert result.returncode == 0, result.stderr
    assert (run / "config.yaml").read_text() == before
    assert (run.with_name(run.name + "-2") / "config.yaml").is_file()
    assert f"{run} already holds a run, so this one is {run.with_name(run.name + '-2')}" in result.stdout


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_user_mistakes_are_one_line_exit_2(tmp_path, trained_run):
    run, _ = trained_run
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.dat").write_bytes(b"\x00" * 50)
    (tmp_path / "empty.txt").write_text("")
    _one_line_error(lmforge("train", "data.sources=[/no/such/file.txt]"), "/no/such/file.txt")
    _one_line_error(lmforge("train", "model.preset=gpt9"), "unknown model preset 'gpt9'")
    _one_line_error(lmforge("train", "train.batch_sise=3"), "unknown config key 'train.batch_sise'")
    _one_line_error(lmforge("train", "train.max_steps=many"), "train.max_steps", "integer")
    _one_line_error(lmforge("train", "-c", "no-such-recipe"), "no-such-recipe")
    _one_line_error(lmforge("train", "--resume", str(tmp_path / "nope")), "nope")
    _one_line_error(lmforge("generate", str(tmp_path / "nope")), "does not exist")
    _one_line_error(lmforge("generate", str(tmp_path)), "not a run directory")
    _one_line_error(lmforge("prepare", str(tmp_path / "bin"), "--out", str(tmp_path / "o1")), "binary")
    _one_line_error(lmforge("prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o2")), "empty.txt")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # A checkpoint whose vocabulary does not match the tokenizer.
    bad = tmp_path / "mismatch"
    subprocess.run(["cp", "-r", str(run), str(bad)], check=True)
    vocab = json.loads((bad / "tokenizer.json").read_text())
    for i in range(200):
        vocab["model"]["vocab"][f"extra{i}"] = 10_000 + i
    (bad / "tokenizer.json").write_text(json.dumps(vocab))
    _one_line_error(lmforge("generate", str(bad), "-p", "x"), "tokenizer", "vocabulary")


def test_a_model_trained_from_scratch_exports_to_transformers_with_identical_greedy_output(trained_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    from lmforge.generate import generate
    from lmforge.loading import load_run

    run, _ = trained_run
    out = tmp_path / "hf"
    result = lmforge("export", str(run), "--format", "hf", "--out", str(out))
    assert result.returncode == 0, result.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_run(run)
    prompt = "def main("
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == ours.tokenizer.encode(prompt)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours.model(ids)[0], atol=1e-4, rtol=0)
        theirs = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None)[0, ids.shape[1]:]
    assert theirs.tolist() == generate(ours.model, ids.tolist(), 20, temperature=0.0)[0]
    # Exporting again into the same folder is refused and leaves it as it was.
    again = lmforge("export", str(run), "--out", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_a_damaged_checkpoint_falls_back_to_the_previous_one_and_resumes_exactly(trained_run, tmp_path):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "checkpoints" / "step_000150" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a torn write
    result = lmforge("generate", str(copy), "-p", "def ", "-n", "5", "-t", "0")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"lmforge: warning: skipped checkpoint '{weights.parent}': model.safetensors has 1000 bytes, "
        f"{(run / 'checkpoints' / 'step_000150' / 'model.safetensors').stat().st_size} were written"]
    # Resuming starts from step 100 and recomputes steps 101-150 exactly as the uninterrupted run did.
    resumed = lmforge("train", "--resume", str(copy))
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stdout + resumed.stderr
    assert "step_000100 (step 100)" in resumed.stdout
    losses = [{r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"} for d in (run, copy)]
    assert losses[0] == losses[1] and max(losses[1]) == 150
    # With no valid checkpoint left: one line, exit 2.
    for step in (100, 150):
        w = copy / "checkpoints" / f"step_000{step}" / "model.safetensors"
        w.write_bytes(w.read_bytes()[:1000])
    _one_line_error(lmforge("generate", str(copy)), "no valid checkpoint (2 damaged; newest step_000150")


def test_a_model_with_non_finite_weights_is_refused_with_one_line(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from lmforge.rundir import write_manifest

    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / "checkpoints" / "step_000150"
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["blocks.0.mlp.fc.weight"][0, 0] = float("nan")  # as a diverged run would have saved it
    save_file(weights, str(ckpt / "model.safetensors"))
    write_manifest(ckpt)
    _one_line_error(lmforge("generate", str(copy), "-n", "5"), "non-finite weights", "blocks.0.mlp.fc.weight",
                    "optim.lr")


def test_bad_flag_values_and_wrong_kinds_of_file_are_one_line_errors(trained_run, tmp_path, capsys):
    from lmforge.cli import main

    run, _ = trained_run

    def fails(*args: str, fragments: tuple[str, ...], code: int = 2) -> None:
        try:
            result = main(list(args))
        except SystemExit as e:  # argparse's own errors
            result = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert result == code and len(err) == 1, err
        assert all(f in err[0] for f in fragments), err[0]

    fails("generate", str(run), "-n", "-5", fragments=("-n", "at least 1, got -5"))
    fails("generate", str(run), "-t", "nan", fragments=("finite number",))
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\x00\xff\xfe binary")
    fails("generate", str(run), "--prompt-file", str(binary), fragments=("--prompt-file", "not UTF-8"))
    fails("generate", str(run), "--prompt-file", str(tmp_path), fragments=("--prompt-file", "is a folder"))
    text = tmp_path / "t.txt"
    text.write_text("the end\n")
    fails("eval", str(run), "--lm", str(text), "-o", str(tmp_path), fragments=("--output", "is a folder"))
    fails("export", str(run), "--out", str(text), fragments=("--out", "is a file"))
    fails("generate", str(run), "--device", "cpu", "--precision", "fp16", fragments=("fp16 is for GPUs",))
