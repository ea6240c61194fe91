"""Data parallelism under torchrun, on CPUs with gloo: DDP and FSDP2 over 2 processes train what one process
trains from the same global batch, on the same samples, and a run killed on N processes resumes on M."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import load_train_config
from lmforge.data.loader import BatchSampler, TokenShard
from lmforge.errors import UserError
from lmforge.runtime import Runtime
from lmforge.training.parallel import Parallel, resolve_grad_accum
from lmforge.training.pretrain import train
from tests.fixtures import LOSS_RTOL, WEIGHT_ATOL, finished_output, sigkill_after, tiny_model, train_losses

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

# fp32, no dropout: exact up to the order in which gradients are summed. 4 sequences per micro-batch, a
# global batch of 8: 2 micro-batches in one process, 1 per process on 2.
# (The architecture the tolerances were measured on: gpt2-tiny's shape with RoPE, RMSNorm and no biases.)
ARGS = ["model.preset=gpt2-tiny", "model.pos_embedding=rope", "model.norm=rmsnorm", "model.bias=false",
        "model.n_layer=2", "model.block_size=32", "model.dropout=0", "optim.name=adamw",
        "optim.warmup_steps=5", "train.precision=fp32", "train.device=cpu", "train.batch_size=4",
        "train.global_batch_size=8", "train.max_steps=30", "train.log_interval=1", "train.ckpt_interval=10",
        "train.keep_last=5", "train.eval_interval=10", "train.eval_batches=2", "sample.num_samples=0"]


def _train(args: list[str], trace: Path, nproc: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMFORGE_TRACE_BATCHES": str(trace)}
    launch = ["--nproc", str(nproc)] if nproc else []
    return subprocess.Popen([sys.executable, "-m", "lmforge", "train", *launch, *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)




def _samples(trace: Path) -> dict[tuple[int, int], list[int]]:
    """(step, global micro-batch) -> the window starts drawn; a step replayed after a resume counts once (its
    last draw), and must have drawn the same."""
    drawn: dict[tuple[int, int], list[int]] = {}
    for record in map(json.loads, trace.read_text().splitlines()):
        key = (record["step"], record["j"])
        assert drawn.setdefault(key, record["offsets"]) == record["offsets"], f"{key} drew other samples"
    return drawn


def _train_here(args: list[str], out: Path) -> tuple[Path, Path]:
    """One process, uninterrupted (in this process: no start-up to wait for): the run directory and its trace."""
    out.mkdir(exist_ok=True)
    os.environ["LMFORGE_TRACE_BATCHES"] = str(out / "trace")
    try:
        train(load_train_config("default", [*args, f"out_dir={out / 'run'}"]), progress=False)
    finally:
        del os.environ["LMFORGE_TRACE_BATCHES"]
    return out / "run", out / "trace"


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> tuple[Path, Path]:
    return _train_here([f"data.dataset_dir={dataset}", *ARGS], tmp_path_factory.mktemp("ref"))


def _assert_same_training(run: Path, trace: Path, reference: tuple[Path, Path]) -> None:
    ref_run, ref_trace = reference
    ref_losses, losses = train_losses(ref_run), train_losses(run)
    assert sorted(losses) == list(range(1, 31))
    for step, loss in losses.items():
        assert abs(loss - ref_losses[step]) <= LOSS_RTOL * abs(ref_losses[step]), (step, loss, ref_losses[step])
    assert _samples(trace) == _samples(ref_trace)
    assert sorted(_samples(trace)) == [(s, j) for s in range(30) for j in range(2)]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def _trainer_state(run: Path, step: int) -> dict[str, torch.Tensor]:
    state = load_file(str(run / "checkpoints" / f"step_{step:06d}" / "trainer.safetensors"))
    return {k: v for k, v in state.items() if not k.startswith("rng.")}


def _memory(run: Path) -> int:
    record = next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "memory")
    return record["param_bytes_per_rank"] + record["optimizer_bytes_per_rank"]


def test_ddp_and_fsdp_on_two_processes_train_what_one_process_trains(dataset, reference, tmp_path):
    runs = {strategy: tmp_path / strategy for strategy in ("ddp", "fsdp")}
    procs = {strategy: _train([f"data.dataset_dir={dataset}", f"out_dir={run}", *ARGS, f"parallel.strategy={strategy}"],
                              tmp_path / f"{strategy}.trace", nproc=2)
             for strategy, run in runs.items()}  # both at once: exact whatever the timing
    for strategy, run in runs.items():
        out = finished_output(procs[strategy])
        trace = tmp_path / f"{strategy}.trace"
        assert f"batch 4 x 2 processes ({strategy}) = 8 sequences" in out
        assert out.count("done:") == 1  # only rank 0 prints
        _assert_same_training(run, trace, reference)
        ref_weights, weights = _weights(reference[0], 10), _weights(run, 10)
        assert sorted(weights) == sorted(ref_weights)  # the same file layout (tied weights under one name)
        assert max((weights[k] - ref_weights[k]).abs().max().item() for k in weights) <= WEIGHT_ATOL
    assert _memory(runs["fsdp"]) <= 0.55 * _memory(runs["ddp"])


def test_fsdp_with_muon_on_two_processes_trains_what_one_process_trains_with_its_state_sharded(dataset, tmp_path):
    # Muon orthogonalizes whole matrices: under FSDP each one is gathered to an owner rank and its slices scattered
    # back. Measured here: losses within 1.7e-7 (relative) of one process's, the optimizer state within 2e-8.
    args = [f"data.dataset_dir={dataset}", *ARGS, "optim.name=muon"]
    ref = _train_here(args, tmp_path)
    run = tmp_path / "fsdp"
    finished_output(_train([*args, f"out_dir={run}", "parallel.strategy=fsdp"], tmp_path / "fsdp.trace", nproc=2))
    _assert_same_training(run, tmp_path / "fsdp.trace", ref)
    # The checkpoint is one process's: the same weights, and the same optimizer state under the same numbering.
    ref_weights, weights = _weights(ref[0], 10), _weights(run, 10)
    assert max((weights[k] - ref_weights[k]).abs().max().item() for k in ref_weights) <= WEIGHT_ATOL
    ref_state, state = _trainer_state(ref[0], 10), _trainer_state(run, 10)
    assert sorted(state) == sorted(ref_state)
    assert max((state[k] - ref_state[k]).abs().max().item() for k in ref_state) <= WEIGHT_ATOL
    # What a DDP process holds: all of it, as one process does (the moments: the state's tensors of 1 dim or more).
    ddp = sum(t.numel() * t.element_size() for d in (ref_weights, ref_state) for t in d.values() if t.dim() > 0)
    assert _memory(run) <= 0.55 * ddp


def _spread_and_orthogonalize(rank: int, world: int, store: str, shapes: list[tuple[int, int]]) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lmforge.training.optim import orthogonalize, orthogonalize_sharded

    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        whole = [torch.randn(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
        sharded = [distribute_tensor(w, mesh, [Shard(0)]) for w in whole]
        done: list[tuple[int, ...]] = []

        def ortho(m: torch.Tensor) -> torch.Tensor:
            done.append(tuple(m.shape))
            return orthogonalize(m, 5, (3.4445, -4.7750, 2.0315), 1e-7, torch.float32)

        mine = orthogonalize_sharded(sharded, ortho)
        assert done == shapes[rank::world]  # each matrix once, whole, by its owner
        for w, s, got in zip(whole, sharded, mine, strict=True):
            start = -(-w.shape[0] // world) * rank  # torch.chunk's rows
            assert got.shape == s.to_local().shape
            # Bitwise equal here (the same GEMMs on the same CPU); the tolerance leaves room for another split of them.
            torch.testing.assert_close(got, ortho(w)[start:start + got.shape[0]], rtol=0, atol=1e-6)
    finally:
        torch.distributed.destroy_process_group()


def test_sharded_orthogonalization_gives_each_rank_its_rows_of_the_whole_matrix_result(tmp_path):
    # 2 ranks, 3 matrices (an owner without a matrix in the second round), rows that do not divide by 2 and a
    # matrix of 1 row (rank 1 holds none of it).
    shapes = [(6, 4), (7, 5), (1, 3)]
    torch.multiprocessing.spawn(_spread_and_orthogonalize, args=(2, str(tmp_path / "store"), shapes), nprocs=2)


@pytest.mark.slow
def test_an_encoder_on_two_ddp_and_fsdp_processes_trains_what_one_process_trains(dataset, tmp_path):
    # The same shape as an encoder: its masked batches (masks seeded by step and global micro-batch) must be the
    # one process's too.
    args = [f"data.dataset_dir={dataset}", *ARGS, "model.arch=encoder"]
    ref = _train_here(args, tmp_path)
    runs = {strategy: tmp_path / strategy for strategy in ("ddp", "fsdp")}
    procs = {strategy: _train([*args, f"out_dir={run}", f"parallel.strategy={strategy}"],
                              tmp_path / f"{strategy}.trace", nproc=2) for strategy, run in runs.items()}
    for strategy, run in runs.items():
        finished_output(procs[strategy])
        _assert_same_training(run, tmp_path / f"{strategy}.trace", ref)


@pytest.mark.slow
def test_a_two_process_run_killed_resumes_on_one_process_on_the_same_samples(dataset, reference, tmp_path):
    run, trace = tmp_path / "run", tmp_path / "trace"
    proc = _train([f"data.dataset_dir={dataset}", f"out_dir={run}", *ARGS], trace, nproc=2)
    sigkill_after(proc, run / "metrics.jsonl", 14, group=True)  # the agent and both workers, between checkpoints
    assert "resuming from" in finished_output(_train(["--resume", str(run)], trace))
    _assert_same_training(run, trace, reference)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_one_process_run_killed_resumes_on_two_fsdp_processes_on_the_same_samples(dataset, reference, optimizer,
                                                                                      tmp_path):
    run, trace = tmp_path / "run", tmp_path / "trace"
    if optimizer == "muon":  # its own uninterrupted reference: Muon's state is loaded into sharded momentum buffers
        reference = _train_here([f"data.dataset_dir={dataset}", *ARGS, "optim.name=muon"], tmp_path / "ref")
    proc = _train([f"data.dataset_dir={dataset}", f"out_dir={run}", *ARGS, f"optim.name={optimizer}"], trace)
    sigkill_after(proc, run / "metrics.jsonl", 14, group=True)
    out = finished_output(_train(["--resume", str(run), "parallel.strategy=fsdp"], trace, nproc=2))
    assert "resuming from" in out
    _assert_same_training(run, trace, reference)


def test_rank_r_of_w_draws_the_global_micro_batches_j_equal_to_r_mod_w(dataset):
    shard = TokenShard(dataset, "train", "uint16", 32)
    one = BatchSampler(shard, 4, seed=3)
    for rank in range(3):
        mine = BatchSampler(shard, 4, seed=3, rank=rank, world_size=3)
        for micro in range(2):
            assert (mine.offsets(7, micro) == one.offsets(7, micro * 3 + rank)).all()


def test_a_global_batch_that_does_not_divide_names_what_fits():
    assert resolve_grad_accum(4, 1, 16, 2) == 2
    assert resolve_grad_accum(4, 3, None, 2) == 3
    with pytest.raises(UserError, match=r"train.global_batch_size=12 is not a multiple of train.batch_size=4 x 2 "
                                        r"processes = 8 \(fits: 8, 16, 24"):
        resolve_grad_accum(4, 1, 12, 2)


def test_fsdp_refuses_a_model_too_small_to_shard():
    par = Parallel(Runtime(torch.device("cpu"), "fp32", rank=0, world_size=128), "fsdp")
    par.active = True  # as under torchrun with 128 processes
    with pytest.raises(UserError, match=r"too small to shard over 128 processes .* at most 64 processes"):
        par.check(tiny_model(n_embd=64, block_size=128), lora=False)


def _lmforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True)


def test_bad_launches_fail_in_one_line_before_any_process_or_file(dataset, tmp_path):
    run = tmp_path / "run"
    too_many = _lmforge("train", "--nproc", str(len(os.sched_getaffinity(0)) + 1), f"data.dataset_dir={dataset}",
                        f"out_dir={run}", *ARGS)
    assert too_many.returncode == 2 and "CPU cores, so at most --nproc" in too_many.stderr
    assert len(too_many.stderr.strip().splitlines()) == 1
    odd = _lmforge("train", "--nproc", "2", f"data.dataset_dir={dataset}", f"out_dir={run}", *ARGS,
                   "train.global_batch_size=12")
    assert odd.returncode == 2 and "train.global_batch_size=12 is not a multiple" in odd.stderr
    assert not run.exists()


def test_a_resume_with_another_global_batch_is_refused_and_changes_nothing(reference, tmp_path):
    run = shutil.copytree(reference[0], tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}  # (the lock: its PID)
    resumed = _lmforge("train", "--resume", str(run), "train.global_batch_size=null", "train.batch_size=2",
                       "train.max_steps=40")
    assert resumed.returncode == 2, resumed.stderr
    assert "it trained with a global batch of 8 sequences per step, this resume would use 4 (train.batch_size 2 x " \
           "train.grad_accum 2 x 1 process); train.grad_accum=4 keeps it" in resumed.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_nccl_process_under_torchrun_trains_what_the_plain_loop_trains(dataset, tmp_path):
    gpu = [f"data.dataset_dir={dataset}", *ARGS, "train.device=cuda", "train.global_batch_size=null",
           "train.max_steps=10"]
    finished_output(_train([*gpu, f"out_dir={tmp_path / 'plain'}"], tmp_path / "plain.trace"))
    out = finished_output(_train([*gpu, f"out_dir={tmp_path / 'ddp'}"], tmp_path / "ddp.trace", nproc=1))
    assert "batch 4 x 1 process (ddp)" in out
    plain, ddp = train_losses(tmp_path / "plain"), train_losses(tmp_path / "ddp")
    assert all(abs(ddp[s] - plain[s]) <= LOSS_RTOL * abs(plain[s]) for s in plain)
