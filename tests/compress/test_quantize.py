"""int8/int4 weight-only quantization: the integers, the kernels, the run directory, and the refusals."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmforge import rundir
from lmforge.cli import main
from lmforge.compress import output
from lmforge.compress.gguf import read_gguf
from lmforge.compress.quantize import quantize_run
from lmforge.compress.report import REPORT
from lmforge.errors import UserError
from lmforge.generate import generate
from lmforge.loading import load_run
from lmforge.model.quantized import QuantLinear, QuantSpec, dequantized, quantize_model


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_weights_are_within_half_a_step_and_the_kernel_computes_with_them(method):
    torch.manual_seed(0)
    w, b = torch.randn(96, 128), torch.randn(96)
    q = QuantLinear.from_weight(w, b, method, 32)
    deq = q.dequantize()
    # One step per output channel (int8) or per group of 32 inputs (int4; its zero's bf16 rounding adds a little).
    step = q.scales[:, None] if method == "int8" else q.scales.float().repeat_interleave(32, dim=1)
    assert ((w - deq).abs() <= step / 2 + 1e-2 * step + 1e-6).all()
    x = torch.randn(5, 3, 128)
    ref = F.linear(x, deq, b)
    # The CPU kernels may run in bf16 activations (measured faster on some CPUs): bf16's rounding bounds the error.
    assert torch.allclose(q(x), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_a_quantized_model_stores_ints_and_reloads_to_the_same_outputs(run_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    report = quantize_run(str(run_dir), str(out), QuantSpec("int4", 32), windows=8, speed=False)
    assert "val perplexity" in capsys.readouterr().out
    info = rundir.read_run_info(out)
    assert (info.kind, info.compression["method"], info.compression["group_size"]) == ("compressed", "int4", 32)
    # Bytes: packed nibbles + bf16 scales and zeros per 32 = 0.3125x bf16; quality close to the source's.
    assert report.after.linear_bytes <= 0.32 * report.before.linear_bf16_bytes
    assert report.after.val_ppl / report.before.val_ppl < 1.10
    assert json.loads((out / REPORT).read_text())["after"]["val_ppl"] == report.after.val_ppl

    loaded = load_run(out).model
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 4 * loaded.cfg.n_layer
    reference = quantize_model(load_run(run_dir).model, QuantSpec("int4", 32))
    ids = torch.randint(0, loaded.cfg.vocab_size, (2, 16))
    assert torch.equal(loaded(ids)[0], reference(ids)[0])
    assert generate(loaded, [[1, 2, 3]], 8, temperature=0) == generate(reference, [[1, 2, 3]], 8, temperature=0)


def test_int8_with_tied_embeddings_included_stores_the_table_once(run_dir, tmp_path, capsys):
    out = tmp_path / "q8"
    report = quantize_run(str(run_dir), str(out), QuantSpec("int8", include_embeddings=True), windows=8, speed=False)
    # A byte per weight and a float32 scale per output channel (0.5x bf16 + 2/in_features).
    model = load_run(out).model
    assert report.after.linear_bytes == sum(m.out_features * (m.in_features + 4) for m in model.modules()
                                            if isinstance(m, QuantLinear) and m is not model.lm_head)
    assert report.after.val_ppl / report.before.val_ppl < 1.02
    stored = load_file(str(rundir.latest_checkpoint(out) / rundir.WEIGHTS))
    assert stored["lm_head.qweight"].dtype == torch.int8 and not any(k.startswith("wte.") for k in stored)
    assert model.wte.table is model.lm_head
    # generate and export read it like any run; export writes the dequantized weights.
    assert main(["generate", str(out), "-p", "import", "-n", "4", "-t", "0"]) == 0
    path = tmp_path / "model.gguf"
    assert main(["export", str(out), "--format", "gguf", "--out", str(path)]) == 0
    assert "dequantized" in capsys.readouterr().out
    _, tensors = read_gguf(path)
    plain = dequantized(model)
    for name, t in plain.state_dict().items():
        assert torch.allclose(torch.from_numpy(tensors[name]), t, atol=2e-3 * t.abs().max().item()), name


def test_bad_quantization_requests_are_refused_in_one_line_and_write_nothing(run_dir, tmp_path, capsys):
    quantized = tmp_path / "q8"
    ended = subprocess.Popen(["true"])
    ended.wait()
    (tmp_path / f".q8.tmp{ended.pid}" / "checkpoints").mkdir(parents=True)  # what a killed quantize left
    quantize_run(str(run_dir), str(quantized), QuantSpec("int8"), windows=2, speed=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8"]  # removed by the next one of that output
    capsys.readouterr()
    out = tmp_path / "out"
    cases = [
        (["quantize", str(quantized), "--method", "int4"], "already quantized"),
        (["quantize", str(run_dir), "--method", "int4", "--group-size", "48"], "--group-size 48"),
        (["quantize", str(run_dir), "--method", "int4", "--group-size", "128"], "does not divide"),
        (["quantize", str(quantized), "--method", "int8", "--out", str(quantized)], "not empty"),
    ]
    for argv, expected in cases:
        argv = argv if "--out" in argv else [*argv, "--out", str(out)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and "\n" not in err and "Traceback" not in err
        assert not out.exists()


def test_an_out_folder_written_by_another_command_meanwhile_is_kept_and_this_one_refused(run_dir, tmp_path,
                                                                                         monkeypatch):
    """Two compressions into one --out at once: the one that finishes second is refused, never merged in."""
    out = tmp_path / "q"
    save = output.save_weights_only

    def and_meanwhile(folder, *args, **kwargs):  # the other command finishes while this one writes
        save(folder, *args, **kwargs)
        out.mkdir()
        (out / "theirs.txt").write_text("kept")

    monkeypatch.setattr(output, "save_weights_only", and_meanwhile)
    with pytest.raises(UserError, match="written by another command meanwhile"):
        quantize_run(str(run_dir), str(out), QuantSpec("int8"), windows=2, speed=False)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary folder left beside it
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_compiled_one_row_product_reads_the_integers_as_the_kernel_does(method):
    """Batch-1 decoding compiled computes a QuantLinear as products and sums over its integers
    (QuantLinear._decode_row), in fp32: the dequantized weight's product, to fp32 rounding."""
    torch.manual_seed(0)
    w, b = torch.randn(96, 128), torch.randn(96)
    q = QuantLinear.from_weight(w, b, method, 32)
    x = torch.randn(1, 1, 128)
    y = torch.compile(q, fullgraph=True)(x)
    # Measured max |difference| ~4e-6 on outputs of magnitude ~30 (fp32 sums in another order).
    torch.testing.assert_close(y, F.linear(x, q.dequantize(), b), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_row_in_a_batch_gets_what_it_gets_alone(method):
    """Several rows go through the dequantized weight, one row through PyTorch's integer kernel: rounded alike, so a
    request's tokens do not depend on what else is in the server's batch."""
    torch.manual_seed(0)
    q = QuantLinear.from_weight(torch.randn(96, 128), torch.randn(96), method, 32)
    x = torch.randn(6, 128)
    alone = torch.cat([q(x[i:i + 1]) for i in range(6)])
    # Measured 8e-6 on outputs of ~40 where the kernel runs in fp32; in bf16 the two may round a sum to neighbouring
    # bf16 values (2^-8 relative), hence 2 steps.
    torch.testing.assert_close(q(x), alone, rtol=8e-3, atol=8e-3 * alone.abs().max().item())
