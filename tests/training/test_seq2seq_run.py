"""Pretraining an encoder-decoder (model.arch=encoder_decoder) by denoising end to end: it learns, its run says what it
is, a resumed run trains exactly what an uninterrupted one does (stopped at a fault point in one process; SIGKILLed
in another, slow), and two DDP or FSDP processes train what one does (slow)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import rundir
from lmforge.cli import main
from lmforge.config import ModelConfig, OptimConfig, from_dict, load_train_config
from lmforge.data.tokenizer import Tokenizer
from lmforge.model import EncoderDecoder
from lmforge.rundir import read_run_info
from lmforge.training import steps
from lmforge.training.optim import build_optimizer
from lmforge.training.pretrain import train
from tests.fixtures import LOSS_RTOL, finished_output, sigkill_after, train_losses

MAX_STEPS = 16
ARGS = ["model.preset=seq2seq-tiny", "model.n_embd=64", "model.block_size=32", "model.dropout=0.1",
        "train.batch_size=8", f"train.max_steps={MAX_STEPS}", "train.log_interval=4", "train.eval_interval=8",
        "train.eval_batches=2", "train.ckpt_interval=8", "optim.warmup_steps=4", "optim.lr=3e-3",
        "train.precision=fp32", "sample.num_samples=2"]
# Dropout on: a resume must restore the random state too. train.precision=fp32, not auto: auto times bf16 against
# fp32 on this host, and two runs can choose differently.


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without what depends on the clock (time, tokens/s, MFU)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("time_s", "tokens_per_s", "mfu")} for r in records]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(rundir.checkpoint_dir(run, MAX_STEPS) / rundir.WEIGHTS))


@pytest.fixture(scope="module")
def seq2seq_run(dataset, tmp_path_factory) -> tuple[Path, str]:
    run = tmp_path_factory.mktemp("s2s") / "run"
    with pytest.MonkeyPatch.context() as mp:
        out = []
        mp.setattr("builtins.print", lambda *a, **k: out.append(" ".join(map(str, a))))
        assert main(["train", f"data.dataset_dir={dataset}", f"out_dir={run}", *ARGS]) == 0
    return run, "\n".join(out)


def test_an_encoder_decoder_learns_to_write_back_corrupted_text_and_its_run_says_what_it_is(seq2seq_run):
    run, out = seq2seq_run
    assert read_run_info(run).task == "seq2seq"
    records = _records(run)
    train_loss = [r["loss"] for r in records if r["kind"] == "train"]
    final = [r for r in records if r["kind"] == "eval"][-1]
    # Characters of json/__init__.py (vocabulary 84 + [CLS] [SEP] [MASK] [PAD]): chance is a loss of ln 88 = 4.5.
    # Measured here: train loss 4.39 (steps 1-4) -> 3.36 (13-16), val loss 3.18, 21% of target tokens right (the
    # space alone is about a fifth of them; a model that copies what the source shows would get 70%).
    assert train_loss[-1] < train_loss[0] - 0.5
    assert final["val_loss"] < 3.5 and final["val_reconstruction_accuracy"] > 0.15
    assert "val_bpb" not in final  # conditioned on the corrupted text: no code length of the text alone
    assert f"done: {MAX_STEPS} steps" in out and "of target tokens right" in out
    assert f"lmforge finetune task=seq2seq base={run}" in out
    assert "denoising sample 2" in out and "[MASK]" in out
    tokenizer = Tokenizer.from_file(run / "tokenizer.json")
    assert tokenizer.token_to_id("[PAD]") is not None and tokenizer.token_to_id("[MASK]") is not None


def test_eval_s_scoring_repeats_the_final_evaluation(seq2seq_run, dataset):
    from lmforge.evaluate.lm import score_denoising_split
    from lmforge.loading import load_run
    from lmforge.runtime import setup_runtime

    run, _ = seq2seq_run
    loaded = load_run(run)
    tc = loaded.config.train
    result = score_denoising_split(loaded.model, loaded.tokenizer, dataset, setup_runtime("cpu", "fp32"), "val",
                                   tc.batch_size, tc.seed, tc.noise_density, tc.mean_noise_span)
    final = [r for r in _records(run) if r["kind"] == "eval"][-1]
    # The same windows and noise, the same model: the same sums (in the same order, one process).
    assert result["loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    assert result["reconstruction_accuracy"] == pytest.approx(final["val_reconstruction_accuracy"], abs=1e-9)


class _Stopped(Exception):
    """Raised at a fault point in place of the SIGKILL the harness sends (LMFORGE_FAULT, which would end pytest)."""


def test_a_run_stopped_mid_step_and_resumed_trains_exactly_what_the_uninterrupted_one_did(seq2seq_run, dataset,
                                                                                           tmp_path, monkeypatch):
    ref, _ = seq2seq_run
    run = tmp_path / "run"
    reached = []

    def stop_in_step_11(name: str) -> None:
        reached.append(name)
        if reached.count("mid_step") == 11:  # decided by steps: after checkpoint 8, inside the log window 9-12
            raise _Stopped

    monkeypatch.setattr(steps, "fault_point", stop_in_step_11)
    args = [f"data.dataset_dir={dataset}", f"out_dir={run}", *ARGS, "sample.num_samples=0"]
    with pytest.raises(_Stopped):
        train(load_train_config("default", args), progress=False)
    assert rundir.latest_checkpoint(run) == rundir.checkpoint_dir(run, 8)
    monkeypatch.undo()
    assert train(load_train_config("default", args), resume=True, progress=False).step == MAX_STEPS
    assert _records(run) == _records(ref)  # losses, lr, grad norms, evaluations: every line, the noise replayed
    weights, ref_weights = _final_weights(run), _final_weights(ref)
    assert weights.keys() == ref_weights.keys() and all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_muon_takes_every_block_matrix_of_both_sides_cross_attention_included():
    cfg = from_dict(ModelConfig, {"preset": "seq2seq-tiny", "n_embd": 32, "vocab_size": 50, "block_size": 16})
    model = EncoderDecoder(cfg)
    opt = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    muon, adamw = opt.parts
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    blocks = [*model.encoder_blocks, *model.decoder_blocks]
    assert in_muon == {id(p) for b in blocks for p in b.parameters() if p.dim() == 2}
    cross = model.decoder_blocks[0].cross
    assert {id(cross.q.weight), id(cross.kv.weight), id(cross.proj.weight)} <= in_muon
    assert id(model.wte.weight) not in in_muon  # embeddings (and the tied head) stay with AdamW
    assert {id(p) for g in adamw.param_groups for p in g["params"]} == {id(p) for p in model.parameters()} - in_muon


def test_auto_precision_times_an_encoder_decoder_s_own_step():
    from lmforge.training.precision import time_train_step

    cfg = from_dict(ModelConfig, {"preset": "seq2seq-tiny", "n_embd": 32, "vocab_size": 50, "block_size": 16})
    seconds, loss = time_train_step(cfg, torch.device("cpu"), None, repeats=1)
    assert seconds > 0 and abs(loss - math.log(50)) < 1  # a source and a target: a real loss at chance level


def test_a_sweep_of_encoder_decoder_trials_knows_their_metrics_and_refuses_what_only_a_decoder_uses(dataset, tmp_path):
    from lmforge.errors import UserError
    from lmforge.sweep import load_sweep

    path = tmp_path / "sweep.yaml"
    head = f"overrides: [model.preset=seq2seq-tiny, data.dataset_dir={dataset}]\n"
    path.write_text(head + "space:\n  sample.temperature: {type: float, low: 0.5, high: 1.0}\n")
    with pytest.raises(UserError, match="space key 'sample.temperature' changes what a decoder writes; these trials "
                                        "train an encoder-decoder .* greedy reconstructions"):
        load_sweep(str(path))
    path.write_text(head + "metric: val_bpb\nspace:\n  optim.lr: {type: float, low: 0.0001, high: 0.01}\n")
    with pytest.raises(UserError, match="metric 'val_bpb' is not one encoder-decoder train trials report"):
        load_sweep(str(path))
    path.write_text(head + "metric: val_reconstruction_accuracy\ndirection: maximize\n"
                    "space:\n  train.noise_density: {type: float, low: 0.15, high: 0.5}\n")
    assert load_sweep(str(path)).metric == "val_reconstruction_accuracy"


# --- slow: other processes ---------------------------------------------------------------------------------------


def _launch(args: list[str], trace: Path | None = None, nproc: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"LMFORGE_TRACE_BATCHES": str(trace)} if trace else {})}
    launch = ["--nproc", str(nproc)] if nproc else []
    return subprocess.Popen([sys.executable, "-m", "lmforge", "train", *launch, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_train_losses(dataset, tmp_path):
    args = [f"data.dataset_dir={dataset}", *ARGS, "train.max_steps=30", "train.log_interval=1",
            "train.eval_interval=25", "sample.num_samples=0"]  # up to step 24 a metrics line is a step
    ref = _launch([*args, f"out_dir={tmp_path / 'ref'}"])
    killed = tmp_path / "killed"
    proc = _launch([*args, f"out_dir={killed}"])
    sigkill_after(proc, killed / "metrics.jsonl", 15)  # between checkpoints: the latest is step 8
    assert 15 <= max(train_losses(killed)) < 30
    assert "resuming from" in finished_output(_launch(["--resume", str(killed)]))
    finished_output(ref)
    expected = train_losses(tmp_path / "ref")
    assert sorted(expected) == list(range(1, 31))
    assert train_losses(killed) == expected  # bit-exact, every step, before and after the kill


def _samples(trace: Path) -> dict[tuple[int, int], list[int]]:
    """(step, global micro-batch) -> the window starts drawn (the noise is seeded by the same pair)."""
    drawn: dict[tuple[int, int], list[int]] = {}
    for record in map(json.loads, trace.read_text().splitlines()):
        key = (record["step"], record["j"])
        assert drawn.setdefault(key, record["offsets"]) == record["offsets"], f"{key} drew other samples"
    return drawn


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_two_ddp_and_fsdp_processes_train_what_one_process_trains(dataset, tmp_path):
    # fp32, no dropout: exact up to the order in which gradients are summed. A global batch of 8: 2 micro-batches of 4
    # in one process, 1 per process on 2. FSDP shards every block of both sides (the decoder's with cross-attention);
    # AdamW, as Muon's whole matrices cannot be sharded.
    args = [f"data.dataset_dir={dataset}", *ARGS, "model.dropout=0", "optim.name=adamw", "train.batch_size=4",
            "train.global_batch_size=8", "train.log_interval=1", "sample.num_samples=0", "train.device=cpu"]
    os.environ["LMFORGE_TRACE_BATCHES"] = str(tmp_path / "ref.trace")
    try:
        train(load_train_config("default", [*args, f"out_dir={tmp_path / 'ref'}"]), progress=False)
    finally:
        del os.environ["LMFORGE_TRACE_BATCHES"]
    ref_losses = train_losses(tmp_path / "ref")
    runs = {strategy: tmp_path / strategy for strategy in ("ddp", "fsdp")}
    procs = {strategy: _launch([*args, f"out_dir={run}", f"parallel.strategy={strategy}"],
                               tmp_path / f"{strategy}.trace", nproc=2) for strategy, run in runs.items()}
    for strategy, run in runs.items():
        out = finished_output(procs[strategy])
        assert f"batch 4 x 2 processes ({strategy}) = 8 sequences" in out
        losses = train_losses(run)
        assert sorted(losses) == list(range(1, MAX_STEPS + 1))
        for step, loss in losses.items():
            assert abs(loss - ref_losses[step]) <= LOSS_RTOL * abs(ref_losses[step]), (strategy, step, loss)
        assert _samples(tmp_path / f"{strategy}.trace") == _samples(tmp_path / "ref.trace")
    memory = {s: next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                      if r["kind"] == "memory") for s, run in runs.items()}
    fsdp, ddp = (memory[s]["param_bytes_per_rank"] + memory[s]["optimizer_bytes_per_rank"] for s in ("fsdp", "ddp"))
    assert fsdp <= 0.55 * ddp  # sharded: encoder_blocks and decoder_blocks, not only a decoder's `blocks`
