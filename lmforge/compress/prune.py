"""``lmforge prune``: remove weights of a trained model, then optionally train it briefly to recover.

Methods, all on the Linear layers of the Transformer blocks (embeddings, norms and the head are kept):

* ``magnitude``: unstructured; in each layer the fraction ``sparsity`` of weights with the smallest |W|
  become zero.
* ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
  unstructured; each weight scores |W_ij| * ||X_j||, X_j the layer's j-th input over calibration tokens,
  and each output row keeps its highest-scoring (1 - sparsity) fraction. One pass over the calibration
  windows collects every layer's input norms (the paper prunes layer by layer on the pruned model's
  activations; here all layers see the dense model's).
* ``structured``: whole MLP neurons go. A neuron scores ||X_j|| * ||W_down[:, j]|| (its activation's norm over
  the calibration tokens times the size of what it writes into the residual stream); the lowest ``ratio``
  fraction of every block's neurons is removed (the same count in each block, a multiple of 32 kept), and the
  model written is genuinely smaller: its config's ``model.intermediate_size`` says so.

Calibration windows come from the run's *train* split by default (the report scores the val split: pruning
tuned on it would flatter itself), or from ``--calibration`` text.

``--recover-steps N`` then trains the pruned run for N steps through the ordinary training loop, on the
source's dataset, from the end of its learning-rate schedule (:func:`recovery_config`); unstructured masks are
held fixed (:mod:`lmforge.training.sparsity`). It checkpoints like any run, and ``lmforge train --resume OUT``
continues it after an interruption.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge import rundir
from lmforge.compress.options import PruneOptions
from lmforge.compress.output import source_weights, train_config_of, write_compressed_run
from lmforge.compress.report import (
    Report,
    Windows,
    describe_device,
    eval_windows,
    format_report,
    measure,
    measure_speeds,
)
from lmforge.config import TrainConfig
from lmforge.errors import UserError
from lmforge.interop import check_new_folder
from lmforge.loading import LoadedRun, load_lm, load_run
from lmforge.model.gpt import GPT
from lmforge.model.quantized import METHODS as QUANT_METHODS
from lmforge.model.quantized import block_linears
from lmforge.runtime import Runtime, eval_mode, setup_runtime
from lmforge.training.pretrain import train
from lmforge.training.sparsity import MASK_FILE, save_masks

METHODS = ("magnitude", "wanda", "structured")
NEURON_MULTIPLE = 32
"""Structured pruning keeps a multiple of this many neurons per block (int4 groups, SIMD widths)."""


@dataclass
class PruneSpec:
    method: str
    sparsity: float = 0.5
    """Unstructured methods: the fraction of each layer's weights set to zero."""
    ratio: float = 0.25
    """Structured: the fraction of each block's MLP neurons removed."""


def check_spec(spec: PruneSpec) -> None:
    if spec.method not in METHODS:
        raise UserError(f"--method {spec.method!r}: expected one of {', '.join(METHODS)}")
    name, value = ("--ratio", spec.ratio) if spec.method == "structured" else ("--sparsity", spec.sparsity)
    if not 0 < value < 1:
        raise UserError(f"{name} {value}: expected a fraction strictly between 0 and 1")


def check_source(source: str) -> None:
    """UserError for a source that cannot be pruned, before it is loaded: adapters only, or quantized."""
    if not rundir.is_run_dir(source) and Path(source).parent.name != rundir.CHECKPOINTS:
        return  # a Hugging Face folder, or a path load_run will explain
    run_dir, ckpt = rundir.resolve_checkpoint(source)
    info = rundir.read_run_info(run_dir)
    if info.lora and not (ckpt / rundir.WEIGHTS).is_file():
        raise UserError(f"'{source}' holds LoRA adapters only ({ckpt / rundir.ADAPTER}): prune its base run, or "
                        f"fine-tune with --merge so that the checkpoint holds full weights")
    if (info.compression or {}).get("method") in QUANT_METHODS:
        raise UserError(f"'{source}' is quantized ({info.compression['method']}): prune its source run, then "
                        f"quantize the pruned one")


# --- scores --------------------------------------------------------------------------------------------


@torch.no_grad()
def input_norms(model: GPT, windows: Windows, rt: Runtime,
                modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """name -> the squared L2 norm of each input feature of ``modules[name]`` over all calibration tokens."""
    sums = {name: torch.zeros(m.in_features, device=rt.device) for name, m in modules.items()}

    def accumulate(name: str, x: torch.Tensor) -> None:  # a pre-hook returning a value would replace the input
        sums[name] += x.detach().float().pow(2).sum(dim=tuple(range(x.dim() - 1)))

    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: accumulate(name, args[0]))
             for name, m in modules.items()]
    try:
        with eval_mode(model):
            for x, _ in windows.batches(8):
                with rt.autocast():
                    model(x.to(rt.device))
    finally:
        for h in hooks:
            h.remove()
    return sums


def magnitude_masks(model: GPT, sparsity: float) -> dict[str, torch.Tensor]:
    """Per layer, True for the weights kept: all but the ``sparsity`` fraction of smallest |W|."""
    masks = {}
    for name, parent, attr in block_linears(model):
        w = getattr(parent, attr).weight.detach()
        masks[f"{name}.weight"] = _keep_top(w.abs().flatten(), w.numel() - int(w.numel() * sparsity)).view_as(w)
    return masks


def wanda_masks(model: GPT, sparsity: float, windows: Windows, rt: Runtime) -> dict[str, torch.Tensor]:
    """Per output row, True for the weights kept: the highest |W_ij| * ||X_j||."""
    linears = {name: getattr(parent, attr) for name, parent, attr in block_linears(model)}
    norms = input_norms(model, windows, rt, linears)
    masks = {}
    for name, m in linears.items():
        score = m.weight.detach().abs() * norms[name].sqrt()[None, :]
        k = m.in_features - int(m.in_features * sparsity)
        masks[f"{name}.weight"] = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.topk(k, dim=1).indices,
                                                                                      True)
    return masks


def _keep_top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(0, scores.topk(k).indices, True)


def apply_masks(model: GPT, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)


# --- structured ----------------------------------------------------------------------------------------


def neurons_kept(hidden: int, ratio: float) -> int:
    """How many of ``hidden`` neurons a block keeps when ``ratio`` of them go (a multiple of NEURON_MULTIPLE where
    the width allows it)."""
    keep = round(hidden * (1 - ratio))
    if hidden >= 2 * NEURON_MULTIPLE:
        keep = max(NEURON_MULTIPLE, round(keep / NEURON_MULTIPLE) * NEURON_MULTIPLE)
    return max(1, min(keep, hidden - 1))


def remove_neurons(model: GPT, windows: Windows, rt: Runtime, ratio: float) -> GPT:
    """A smaller GPT without the lowest-scoring MLP neurons of every block (see the module docstring)."""
    downs = {f"blocks.{i}": b.mlp.proj for i, b in enumerate(model.blocks)}
    norms = input_norms(model, windows, rt, downs)
    cfg = copy.deepcopy(model.cfg)
    hidden = cfg.mlp_hidden
    keep = neurons_kept(hidden, ratio)
    cfg.intermediate_size = keep
    small = GPT(cfg).to(rt.device)
    sd = model.state_dict()
    swiglu = cfg.mlp == "swiglu"
    for i, block in enumerate(model.blocks):
        score = norms[f"blocks.{i}"].sqrt() * block.mlp.proj.weight.detach().norm(dim=0)
        idx = score.topk(keep).indices.sort().values
        # The fused fc holds [gate; up] for SwiGLU: a neuron's two rows go together.
        rows = torch.cat([idx, idx + hidden]) if swiglu else idx
        p = f"blocks.{i}.mlp."
        sd[p + "fc.weight"] = sd[p + "fc.weight"][rows]
        if cfg.bias:
            sd[p + "fc.bias"] = sd[p + "fc.bias"][rows]
        sd[p + "proj.weight"] = sd[p + "proj.weight"][:, idx]
    small.load_state_dict(sd)
    return small.eval()


# --- the command ---------------------------------------------------------------------------------------


def recovery_config(cfg: TrainConfig, out: Path, steps: int) -> TrainConfig:
    """The source's training config for ``steps`` more steps into ``out``: same data, batch and optimizer, at the
    learning rate its schedule ended on (lr and muon_lr scaled by min_lr / lr), a 10% warmup and a cosine decay
    by the same factor again. A dense model trained the same way is the fair comparison (bench/compress.py)."""
    rc = copy.deepcopy(cfg)
    rc.out_dir = str(out)
    t, o = rc.train, rc.optim
    t.max_steps, t.budget_minutes, t.max_minutes, t.patience = steps, None, None, None
    t.eval_interval = min(t.eval_interval, steps)
    t.ckpt_interval = min(t.ckpt_interval, steps)
    t.log_interval = min(t.log_interval, steps)
    factor = o.min_lr / o.lr if o.lr > 0 else 1.0
    o.lr, o.muon_lr = o.min_lr, o.muon_lr * factor
    o.min_lr = o.lr * factor
    o.schedule, o.warmup_steps, o.decay_steps = "cosine", max(1, steps // 10), None
    rc.sample.num_samples = 0
    return rc


def _dataset_of(run: LoadedRun) -> str | None:
    cfg = run.config
    if isinstance(cfg, TrainConfig) and cfg.data.dataset_dir and (Path(cfg.data.dataset_dir) / "meta.json").is_file():
        return cfg.data.dataset_dir
    return None


def prune_run(source: str, out: str, spec: PruneSpec, *, calibration: list[str] | None = None,
              calibration_windows: int = 128, data: list[str] | None = None, windows: int = 64,
              recover_steps: int = 0, speed: bool = True, device: str = "cpu", progress: bool = True) -> Report:
    """Prune ``source`` into the new run directory ``out`` (then recover it for ``recover_steps``); returns the
    report (also written there)."""
    check_spec(spec)
    if recover_steps < 0:
        raise UserError(f"--recover-steps {recover_steps}: expected 0 (none) or a positive number of steps")
    out_dir = Path(out)
    check_new_folder(out_dir)
    check_source(source)
    rt = setup_runtime(device, "fp32")
    run = load_lm(source, rt.device, "lmforge prune")
    if recover_steps and _dataset_of(run) is None:
        raise UserError(f"--recover-steps trains on the source's dataset, and '{source}' has none (a pretraining "
                        f"run has one); prune without --recover-steps")
    ev = eval_windows(run, windows, data)
    calib = eval_windows(run, calibration_windows, calibration, split="train") if spec.method != "magnitude" else None
    if spec.method != "magnitude" and calib is None:
        raise UserError(f"--method {spec.method} needs calibration text: '{source}' has no dataset, give "
                        f"--calibration FILES")
    before = measure(run.model, ev, rt, source_weights(run))
    masks = None
    if spec.method == "structured":
        model = remove_neurons(run.model, calib, rt, spec.ratio)
    else:
        masks = magnitude_masks(run.model, spec.sparsity) if spec.method == "magnitude" \
            else wanda_masks(run.model, spec.sparsity, calib, rt)
        # The masks apply in place: the source stays whole beside the copy when the two are timed.
        model = copy.deepcopy(run.model) if speed else run.model
        apply_masks(model, masks)
    after = measure(model, ev, rt, None)
    compression = {"method": spec.method, "source": str(run.checkpoint),
                   **({"ratio": spec.ratio, "intermediate_size": model.cfg.intermediate_size}
                      if spec.method == "structured" else {"sparsity": spec.sparsity, "mask": MASK_FILE}),
                   "calibration": calib.source if calib else None, "recover_steps": recover_steps}
    cfg = train_config_of(run)
    cfg.model = model.cfg
    if recover_steps:
        cfg = recovery_config(cfg, out_dir, recover_steps)
    report = Report(command="prune", source=str(run.checkpoint), out=str(out_dir), method=compression,
                    before=before, after=after, windows=ev.source if ev else None,
                    n_windows=len(ev.tokens) if ev else 0, device=describe_device(rt))
    if masks is not None:
        report.notes.append("unstructured zeros are stored dense: the file does not shrink, and dense kernels run "
                            "no faster (the quantity is quality at a sparsity level, e.g. for 2:4 hardware)")
    write_compressed_run(run, cfg, model, out_dir, compression,
                         extra=(lambda folder: save_masks(folder, masks)) if masks is not None else None)
    report.after.file_bytes = (rundir.latest_checkpoint(out_dir) / rundir.WEIGHTS).stat().st_size
    timed = [(run.model, report.before), (model, report.after)]
    with rundir.lock(out_dir):  # one writer from here to the report (the recovery's train() takes it again)
        if recover_steps:
            report.write(out_dir)  # the pruned model's figures (no speed yet), in case the recovery is interrupted
            train(cfg, resume=True, progress=progress)
            recovered = load_run(out_dir, rt.device)
            report.recovered = measure(recovered.model, ev, rt, rundir.latest_checkpoint(out_dir) / rundir.WEIGHTS)
            timed.append((recovered.model, report.recovered))
        if speed:  # every model timed against the source in the same rounds
            measure_speeds(timed, run.tokenizer, ev, rt)
        report.write(out_dir)
    print(format_report(report))
    return report


def prune_command(o: PruneOptions) -> None:
    """``lmforge prune``: prune (and recover), print the report, say where the new run is."""
    report = prune_run(o.run, o.out, PruneSpec(o.method, o.sparsity, o.ratio), calibration=o.calibration or None,
                       calibration_windows=o.calibration_windows, data=o.data or None, windows=o.windows,
                       recover_steps=o.recover_steps, speed=not o.no_speed, device=o.report_device)
    print(f"\nwrote {report.out} (use it wherever a run directory is accepted)")
