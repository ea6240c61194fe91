"""Helpers that tests share: tiny models, and running, killing and reading training processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from lmforge.config import ModelConfig, from_dict
from lmforge.model.gpt import GPT

HANG_S = 600
"""How long a test waits for a process or a condition before it takes it to hang. Every wait ends as soon as what
it waits for happens, so this limit never decides a healthy run: it is generous, for a 2-core CPU with two other
busy processes beside the suite (~3x slower than alone)."""


# Another number of processes sums the gradients in another order (FSDP also reshards them), and the last-bit
# differences grow through training, by how much depends on the CPU's kernels. Measured with the ARGS of
# tests/training/test_parallel.py on a 2-core AMD EPYC (Zen 4, AVX512-BF16, no AMX; torch 2.13 CPU): DDP on 2
# processes matched 1 process exactly; FSDP differed by up to 1.5e-5 relative (step 27) and 1.3e-7 in the step-10
# weights. One process with every weight moved by one ULP after step 1 (6 seeds, standing in for other kernels'
# rounding): up to 1.6e-4 (step 27; at most 3.6e-6 up to step 20) and 4.8e-7 in the weights. A real difference is
# far larger: a learning rate 1% higher gives up to 2.3e-2 (over 1e-3 at 17 of the 30 steps) and 7e-3 in the
# weights.
LOSS_RTOL = 1e-3
"""Relative difference allowed between the per-step losses of runs on different numbers of processes."""
WEIGHT_ATOL = 1e-5
"""Absolute difference allowed between their step-10 weights."""


def tiny_model(preset: str = "gpt2-tiny", **overrides) -> GPT:
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, {"preset": preset, "vocab_size": 97, "n_layer": 2, "block_size": 32,
                                  **overrides})
    return GPT(cfg).eval()


def sigkill_after(proc: subprocess.Popen, metrics: Path, n_lines: int, timeout: float = HANG_S,
                  group: bool = False) -> None:
    """SIGKILL a training process once its metrics.jsonl has ``n_lines`` records (mid-run, between
    checkpoints); fails if the run ends first. ``group``: its whole process group (a process started with
    start_new_session, and every process it started: torchrun's agent and workers)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n_lines:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"


def finished_output(proc: subprocess.Popen, timeout: float = HANG_S) -> str:
    """The output of a process that must end successfully."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl (each step recorded once)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == sorted(set(steps)), "metrics.jsonl must hold each step once"
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def hf_gpt2(tie: bool = True):
    """A tiny random transformers GPT2LMHeadModel (vocabulary 101)."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=101, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  tie_word_embeddings=tie, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def hf_llama(tie: bool = False, **kw):
    """A tiny random transformers LlamaForCausalLM with GQA (vocabulary 101), biases made non-zero."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=5000.0, tie_word_embeddings=tie, **kw)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits biases to zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def save_hf_folder(hf, folder: Path, tokenizer) -> None:
    """A Hugging Face model folder as save_pretrained writes it, with our tokenizer.json."""
    hf.save_pretrained(folder, safe_serialization=True)
    tokenizer.save(folder / "tokenizer.json")


def save_seq2seq_run(folder: Path, model: torch.nn.Module, tokenizer) -> Path:
    """``folder`` as a pretraining run directory of encoder-decoder ``model`` and its ``tokenizer`` (which must hold
    the framing's [PAD] and [MASK]: ``Seq2SeqTokens.of(tokenizer)`` adds them), written without training."""
    from lmforge import rundir
    from lmforge.config import TrainConfig, save_yaml
    from lmforge.training.checkpoint import save_weights_only

    folder.mkdir(parents=True)
    save_yaml(TrainConfig(out_dir=str(folder), model=model.cfg), folder / rundir.CONFIG)
    tokenizer.save(folder / rundir.TOKENIZER)
    rundir.write_run_info(folder, "pretrain", "seq2seq")
    save_weights_only(folder, 0, model)
    return folder
