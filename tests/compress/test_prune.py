"""Pruning: which weights each method removes, the smaller model structured pruning writes, recovery with the
mask held fixed (and resumed), and the refusals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge import rundir
from lmforge.cli import main
from lmforge.compress.prune import (
    PruneSpec,
    input_norms,
    magnitude_masks,
    neurons_kept,
    prune_run,
    remove_neurons,
    wanda_masks,
)
from lmforge.compress.quantize import quantize_run
from lmforge.compress.report import Windows
from lmforge.model.quantized import QuantSpec
from lmforge.runtime import setup_runtime
from lmforge.training.checkpoint import save_weights_only
from lmforge.training.sparsity import MASK_FILE
from tests.fixtures import tiny_model


def _windows(vocab: int, n: int = 6, length: int = 33) -> Windows:
    torch.manual_seed(1)
    return Windows(torch.randint(0, vocab, (n, length)), "random tokens")


def test_magnitude_zeroes_the_smallest_weights_of_each_layer():
    model = tiny_model()
    for name, mask in magnitude_masks(model, 0.5).items():
        w = dict(model.named_parameters())[name].detach().abs()
        assert (~mask).sum() == w.numel() // 2
        assert w[mask].min() >= w[~mask].max()


def test_wanda_scores_each_row_by_weight_times_its_input_norm():
    model, rt = tiny_model(), setup_runtime("cpu", "fp32")
    windows = _windows(model.cfg.vocab_size)
    # The first layer's input, computed directly: the first block's norm of the embeddings.
    x = windows.tokens[:, :-1]
    h = model.blocks[0].norm1(model.wte(x) + model.wpe(torch.arange(x.shape[1])))
    norms = input_norms(model, windows, rt, {"qkv": model.blocks[0].attn.qkv})
    assert torch.allclose(norms["qkv"], h.pow(2).sum(dim=(0, 1)), rtol=1e-4)
    masks = wanda_masks(model, 0.5, windows, rt)
    w = model.blocks[0].attn.qkv.weight.detach()
    score, mask = w.abs() * norms["qkv"].sqrt(), masks["blocks.0.attn.qkv.weight"]
    assert ((~mask).sum(dim=1) == w.shape[1] // 2).all()  # the same sparsity in every output row
    for row in range(w.shape[0]):
        assert score[row][mask[row]].min() >= score[row][~mask[row]].max()


@pytest.mark.parametrize("preset", ["gpt2-tiny", "llama-tiny"])
def test_structured_pruning_computes_what_the_model_does_with_those_neurons_silenced(preset):
    model, rt = tiny_model(preset), setup_runtime("cpu", "fp32")
    small = remove_neurons(model, _windows(model.cfg.vocab_size), rt, 0.25)
    hidden = model.cfg.mlp_hidden
    assert small.cfg.intermediate_size == neurons_kept(hidden, 0.25) < hidden
    assert small.num_params() < model.num_params()
    # Silence the removed neurons in the full model: their fc rows (gate and up for SwiGLU) and biases at zero.
    with torch.no_grad():
        for big, little in zip(model.blocks, small.blocks, strict=True):
            kept = {tuple(r.tolist()) for r in little.mlp.proj.weight.T}
            gone = [j for j in range(hidden) if tuple(big.mlp.proj.weight[:, j].tolist()) not in kept]
            assert len(gone) == hidden - small.cfg.intermediate_size
            for j in gone:
                for row in ([j, j + hidden] if preset.startswith("llama") else [j]):
                    big.mlp.fc.weight[row] = 0
                    if big.mlp.fc.bias is not None:
                        big.mlp.fc.bias[row] = 0
    ids = torch.randint(0, model.cfg.vocab_size, (2, 20))
    assert torch.allclose(small(ids)[0], model(ids)[0], atol=1e-5)


def test_recovery_trains_with_the_mask_held_and_resumes_like_any_run(run_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    report = prune_run(str(run_dir), str(out), PruneSpec("wanda", 0.5), windows=4, calibration_windows=8,
                       recover_steps=4, speed=False)
    printed = capsys.readouterr().out
    # The recovery starts from the pruned weights with a fresh optimizer: nothing is resumed.
    assert f"starting from the weights of {out}" in printed and "resuming" not in printed
    assert report.recovered is not None and report.recovered.val_ppl < report.after.val_ppl
    mask = load_file(str(out / MASK_FILE))
    assert rundir.read_run_info(out).compression["mask"] == MASK_FILE

    def pruned_weights_are_zero() -> bool:
        weights = load_file(str(rundir.latest_checkpoint(out) / rundir.WEIGHTS))
        return all(bool((weights[name][~m] == 0).all()) for name, m in mask.items())

    assert rundir.latest_checkpoint(out).name == "step_000004" and pruned_weights_are_zero()
    assert main(["train", "--resume", str(out), "train.max_steps=6"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert rundir.latest_checkpoint(out).name == "step_000006" and pruned_weights_are_zero()


def test_bad_prune_requests_are_refused_in_one_line_and_write_nothing(run_dir, tmp_path, capsys):
    lora = tmp_path / "lora"
    lora.mkdir()
    rundir.write_run_info(lora, "finetune", "sft", lora=True)
    (lora / rundir.CONFIG).write_text("{}\n")
    ckpt = save_weights_only(lora, 3, torch.nn.Linear(1, 1))
    (ckpt / rundir.WEIGHTS).rename(ckpt / rundir.ADAPTER)
    save_file({"a": torch.zeros(1)}, str(ckpt / rundir.ADAPTER))
    rundir.write_manifest(ckpt)
    quantized = tmp_path / "q"
    quantize_run(str(run_dir), str(quantized), QuantSpec("int8"), windows=2, speed=False)
    capsys.readouterr()
    out = tmp_path / "out"
    cases = [
        (["prune", str(run_dir), "--method", "wanda", "--sparsity", "1"], "--sparsity 1.0"),
        (["prune", str(run_dir), "--method", "magnitude", "--sparsity", "0"], "--sparsity 0.0"),
        (["prune", str(run_dir), "--method", "structured", "--ratio", "1.5"], "--ratio 1.5"),
        (["prune", str(run_dir), "--method", "wanda", "--recover-steps", "-3"], "--recover-steps -3"),
        (["prune", str(lora), "--method", "magnitude"], "LoRA adapters only"),
        (["prune", str(quantized), "--method", "magnitude"], "is quantized"),
    ]
    for argv, expected in cases:
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err and "Traceback" not in err, err
        assert not out.exists()
