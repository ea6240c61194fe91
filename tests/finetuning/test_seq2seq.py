"""Sequence-to-sequence fine-tuning (task=seq2seq) of a small encoder-decoder: it learns to copy random strings (which
it can only do by reading the source), the target alone carries loss, truncation is counted, user mistakes are one
line, and LoRA adapts both sides and cross-attention."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import load_finetune_config
from lmforge.data.seq2seq import collate_pairs
from lmforge.errors import UserError
from lmforge.evaluate.seq2seq import encode_checked, score_pairs, target_nll
from lmforge.finetuning.finetune import finetune
from lmforge.finetuning.seq2seq import Seq2SeqTask
from lmforge.loading import load_run
from lmforge.model.encoder_decoder import EncoderDecoder
from lmforge.rundir import read_run_info, write_manifest
from lmforge.runtime import setup_runtime
from tests.finetuning.tasks import write_random_base
from tests.fixtures import HANG_S

FAST = ["task=seq2seq", "train.batch_size=16", "optim.warmup_steps=5", "train.log_interval=50", "train.device=cpu",
        "train.precision=fp32"]
"""fp32: the loaded run (fp32) must score what the run's final evaluation did."""


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def copy_pairs(tmp_path_factory) -> Path:
    """32 pairs 'prompt' -> the same 5 random letters of 8: a model that ignores its source can at best learn which
    strings occur (about ln 8 nats per letter); one that reads it can copy (near 0)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(5)) for _ in range(32)]
    return _write(tmp_path_factory.mktemp("copy") / "train.jsonl", [{"prompt": w, "reference": w} for w in words])


def _shuffled_sources(path: Path, out: Path) -> Path:
    """The same targets, each with the next record's source."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return _write(out, [{"prompt": records[(i + 1) % len(records)]["prompt"], "reference": r["reference"]}
                        for i, r in enumerate(records)])


def test_an_encoder_decoder_learns_to_copy_its_sources_and_eval_scores_the_run_as_its_final_evaluation(
        seq2seq_base, copy_pairs, tmp_path):
    cfg = load_finetune_config(None, [*FAST, f"base={seq2seq_base}", f"data.train={copy_pairs}",
                                      f"data.val={copy_pairs}", f"out_dir={tmp_path / 'copy'}", "train.max_steps=80",
                                      "train.eval_interval=80", "optim.lr=1e-3", "optim.min_lr=1e-3"])
    result = finetune(cfg, progress=False)
    assert read_run_info(result.run_dir).task == "seq2seq"
    rt = setup_runtime("cpu", "fp32")
    base, run = load_run(seq2seq_base), load_run(result.run_dir)
    assert isinstance(run.model, EncoderDecoder) and run.task == "seq2seq"
    before = score_pairs(base.model, base.tokenizer, str(copy_pairs), rt)
    after = score_pairs(run.model, run.tokenizer, str(copy_pairs), rt)
    # `lmforge eval`'s figure is the run's own final val loss (the same pairs, framing and sums).
    assert after["loss"] == pytest.approx(result.metrics["val_loss"], rel=1e-5)
    assert result.metrics["val_ppl"] == pytest.approx(after["perplexity"], rel=1e-5)
    assert after["target_tokens"] == 32 * 6 and after["examples"] == 32  # 5 letters and end-of-text each
    assert before["loss"] > 4 and after["loss"] < 0.5, (before, after)  # measured 4.50 -> 0.17
    # It reads its source: the same targets after other sources are far less likely.
    other = score_pairs(run.model, run.tokenizer, str(_shuffled_sources(copy_pairs, tmp_path / "other.jsonl")), rt)
    assert other["loss"] > after["loss"] + 1.5, (other, after)  # measured 3.02


def test_only_target_tokens_are_labels_and_padding_changes_no_pair_s_loss(seq2seq_base):
    base = load_run(seq2seq_base)
    tok = base.tokenizer
    pairs = [("abcabc", "xy"), ("ab", "xyzxyzxyz"), ("abcabcabcabc", "z")]  # sources and targets share no letter
    encoded = encode_checked(tok, pairs, 64, base.model.cfg.vocab_size, "test")
    src, src_mask, tgt, labels = collate_pairs(encoded.sources, encoded.targets, encoded.pad)
    eos = tok.eot_id
    for row, (_, target) in zip(labels.tolist(), pairs, strict=True):
        # The labels are the target's tokens and its end-of-text, then -100: never a source token, never padding.
        assert [t for t in row if t != -100] == [*tok.encode(target), eos]
        assert row[len(target) + 1:] == [-100] * (len(row) - len(target) - 1)
    source_ids = {i for s, _ in pairs for i in tok.encode(s)}
    assert not source_ids & set(labels.flatten().tolist())
    assert tgt[:, 0].eq(eos).all() and src_mask.sum(1).tolist() == [len(s) + 1 for s, _ in pairs]
    # Each pair scores the same alone as padded into a batch with longer ones.
    rt = setup_runtime("cpu", "fp32")
    together, n = target_nll(base.model, encoded.sources, encoded.targets, encoded.pad, rt, batch_size=3)
    alone = [target_nll(base.model, [s], [t], encoded.pad, rt, batch_size=1)
             for s, t in zip(encoded.sources, encoded.targets, strict=True)]
    assert n == sum(k for _, k in alone) == sum(len(t) + 1 for _, t in pairs)
    assert together == pytest.approx(sum(x for x, _ in alone), rel=1e-5)


def test_pairs_longer_than_the_context_are_truncated_with_one_warning_counting_them(seq2seq_base, tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"prompt": "a" * 40, "reference": "b"},
                                              {"prompt": "a" * 15, "reference": "b" * 30},
                                              {"prompt": "a" * 16, "reference": "b"},
                                              {"prompt": "short", "reference": "b" * 15}])
    val = _write(tmp_path / "val.jsonl", [{"prompt": "abc", "reference": "cba"}])
    cfg = load_finetune_config(None, [*FAST, f"base={seq2seq_base}", f"data.train={train}", f"data.val={val}"])
    base = load_run(seq2seq_base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = Seq2SeqTask(cfg, base.model, base.tokenizer, 16, setup_runtime("cpu", "fp32"))
    assert [str(w.message) for w in caught] == [
        f"{train}: 2 of 4 sources and 1 of 4 targets are longer than 16 tokens with their end-of-text: truncated, "
        f"each keeping its beginning"]  # 15 + end-of-text fits; 16 does not
    assert [len(s) for s in task.train.sources] == [16, 16, 16, 6]
    assert [len(t[1]) for t in task.train.targets] == [2, 16, 2, 16]
    assert "truncated: 2 sources, 1 targets" in "\n".join(task.summary)
    loss = task.loss(task.model, task.batch([0, 1, 2, 3]))
    assert torch.isfinite(loss)


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "abc"}, "missing field 'reference': expected the target text"),
    ({"prompt": "abc", "reference": ""}, "field 'reference' is empty: expected the target text"),
    ({"prompt": " ", "reference": "abc"}, "field 'prompt' is empty: expected the source text"),
    ({"source": "abc", "reference": "abc"}, "missing field 'prompt': expected the source text"),
    ({"prompt": "abc", "reference": ["abc"]}, "field 'reference' should be a str, got list"),
])
def test_a_bad_record_stops_with_one_line_naming_it(seq2seq_base, tmp_path, record, message):
    good = {"prompt": "abc", "reference": "cba"}
    path = _write(tmp_path / "bad.jsonl", [good, good, good, record])
    cfg = load_finetune_config(None, [*FAST, f"base={seq2seq_base}", f"data.train={path}",
                                      f"out_dir={tmp_path / 'run'}", "train.max_steps=1"])
    with pytest.raises(UserError) as e:
        finetune(cfg, progress=False)
    assert str(e.value).startswith(f"{path}:4: {message}") and "\n" not in str(e.value), str(e.value)


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bases")
    return {"decoder": write_random_base(folder / "decoder", "gpt2-tiny"),
            "encoder": write_random_base(folder / "encoder", "bert-tiny")}


@pytest.mark.parametrize(("task", "arch", "fragments"), [
    ("seq2seq", "decoder", ("is a decoder (model.arch=decoder): task=seq2seq needs an encoder-decoder base",
                            "a decoder fine-tunes with task=sft, classify or token_classify")),
    ("seq2seq", "encoder", ("is an encoder (model.arch=encoder): task=seq2seq needs an encoder-decoder base",
                            "an encoder fine-tunes with task=classify or token_classify")),
    ("sft", "encoder_decoder", ("is an encoder-decoder (model.arch=encoder_decoder): task=seq2seq fine-tunes it",
                                "task=sft: chat fine-tuning of a decoder-only model does not apply")),
    ("classify", "encoder_decoder", ("task=seq2seq fine-tunes it",
                                     "classification on an encoder-decoder is not built")),
    ("token_classify", "encoder_decoder", ("task=seq2seq fine-tunes it",
                                           "token classification on an encoder-decoder is not built")),
])
def test_a_task_the_base_does_not_take_is_refused_naming_its_arch(seq2seq_base, other_bases, copy_pairs, tmp_path,
                                                                    task, arch, fragments):
    base = seq2seq_base if arch == "encoder_decoder" else other_bases[arch]
    cfg = load_finetune_config(None, [f"task={task}", f"base={base}", f"data.train={copy_pairs}",
                                      f"out_dir={tmp_path / 'run'}"])
    with pytest.raises(UserError) as e:
        finetune(cfg, progress=False)
    assert all(f in str(e.value) for f in fragments) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


def test_the_command_refuses_in_one_line_with_exit_status_2(other_bases, copy_pairs, tmp_path):
    result = subprocess.run([sys.executable, "-m", "lmforge", "finetune", "task=seq2seq",
                             f"base={other_bases['decoder']}", f"data.train={copy_pairs}",
                             f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=HANG_S)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "model.arch=decoder" in result.stderr, result.stderr


def test_lora_adapts_both_sides_and_cross_attention_and_loads_the_same_from_adapters_as_merged(
        seq2seq_base, copy_pairs, tmp_path):
    cfg = load_finetune_config(None, [*FAST, f"base={seq2seq_base}", f"data.train={copy_pairs}",
                                      f"out_dir={tmp_path / 'lora'}", "lora.rank=4", "lora.merge=true",
                                      "train.max_steps=5", "train.eval_interval=5", "optim.lr=3e-3"])
    result = finetune(cfg, progress=False)
    assert read_run_info(result.run_dir).lora and read_run_info(result.run_dir).task == "seq2seq"
    ckpt = result.run_dir / "checkpoints" / "step_000005"
    adapter = load_file(ckpt / "adapter.safetensors")
    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in adapter}
    for block in ("encoder_blocks.0", "decoder_blocks.1"):
        assert {f"{block}.attn.qkv", f"{block}.attn.proj", f"{block}.mlp.fc"} <= adapted
    assert {"decoder_blocks.0.cross.q", "decoder_blocks.0.cross.kv", "decoder_blocks.0.cross.proj"} <= adapted
    adapters_only = tmp_path / "adapters_only"
    shutil.copytree(result.run_dir, adapters_only)
    (adapters_only / "checkpoints" / "step_000005" / "model.safetensors").unlink()
    write_manifest(adapters_only / "checkpoints" / "step_000005")  # as a run without lora.merge writes it
    merged, from_adapters, base = load_run(result.run_dir), load_run(adapters_only), load_run(seq2seq_base)
    assert isinstance(merged.model, EncoderDecoder) and isinstance(from_adapters.model, EncoderDecoder)
    src, tgt = torch.tensor([merged.tokenizer.encode("abcde") + [merged.tokenizer.eot_id]]), torch.tensor([[0, 3, 4]])
    tgt[0, 0] = merged.tokenizer.eot_id
    with torch.no_grad():
        logits = merged.model(src, tgt)[0]
        torch.testing.assert_close(from_adapters.model(src, tgt)[0], logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base.model(src, tgt)[0], logits, atol=1e-3)
