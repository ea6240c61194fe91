"""``lmforge quantize``: a run's Linear weights as int8 or int4 (:mod:`lmforge.model.quantized`), written as a new
run directory that ``generate``, ``eval``, ``serve`` and ``export`` load like any other, with a report of what it
cost and gained (:mod:`lmforge.compress.report`)."""

from __future__ import annotations

import copy
from pathlib import Path

from lmforge import rundir
from lmforge.compress.options import QuantizeOptions
from lmforge.compress.output import source_weights, train_config_of, write_compressed_run
from lmforge.compress.report import Report, describe_device, eval_windows, format_report, measure, measure_speeds
from lmforge.errors import UserError
from lmforge.interop import check_new_folder
from lmforge.loading import LoadedRun, load_lm
from lmforge.model.quantized import INT4_GROUP_SIZES, METHODS, QuantSpec, block_linears, quantize_model, state_for_disk
from lmforge.runtime import setup_runtime


def check_quantizable(run: LoadedRun, source: str, spec: QuantSpec) -> None:
    """UserError naming the problem unless ``run`` can be quantized per ``spec``."""
    if spec.method not in METHODS:
        raise UserError(f"--method {spec.method!r}: expected one of {', '.join(METHODS)}")
    info = rundir.read_run_info(run.folder) if rundir.is_run_dir(run.folder) else None
    done = (info.compression or {}).get("method") if info is not None else None
    if done in METHODS:
        raise UserError(f"'{source}' is already quantized ({done}): quantize its source run instead")
    if spec.method != "int4":
        return
    if spec.group_size not in INT4_GROUP_SIZES:
        raise UserError(f"--group-size {spec.group_size}: PyTorch's int4 kernels take "
                        f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    widths = {getattr(parent, attr).in_features for _, parent, attr in block_linears(run.model)}
    if spec.include_embeddings:
        widths.add(run.model.cfg.n_embd)
    bad = sorted(w for w in widths if w % spec.group_size)
    if bad:
        raise UserError(f"--group-size {spec.group_size} does not divide the model's Linear input width "
                        f"{bad[0]} (model.n_embd / model.intermediate_size): pick a group size that does")


def quantize_run(source: str, out: str, spec: QuantSpec, *, data: list[str] | None = None, windows: int = 64,
                 speed: bool = True, device: str = "cpu") -> Report:
    """Quantize the run (or checkpoint, or HF folder) ``source`` into the new run directory ``out``; returns the
    report (also written there)."""
    out_dir = Path(out)
    check_new_folder(out_dir)
    rt = setup_runtime(device, "fp32")
    run = load_lm(source, rt.device, "lmforge quantize")
    check_quantizable(run, source, spec)
    ev = eval_windows(run, windows, data)
    before = measure(run.model, ev, rt, source_weights(run))
    # quantize_model works in place: the source stays whole beside the copy when the two are timed.
    model = quantize_model(copy.deepcopy(run.model) if speed else run.model, spec)
    after = measure(model, ev, rt, None)
    if speed:
        measure_speeds([(run.model, before), (model, after)], run.tokenizer, ev, rt)
    compression = {"method": spec.method, "group_size": spec.group_size if spec.method == "int4" else None,
                   "include_embeddings": spec.include_embeddings, "source": str(run.checkpoint)}
    report = Report(command="quantize", source=str(run.checkpoint), out=str(out_dir), method=compression,
                    before=before, after=after, windows=ev.source if ev else None,
                    n_windows=len(ev.tokens) if ev else 0, device=describe_device(rt))
    if not spec.include_embeddings:
        report.notes.append("the token embedding and output head are stored in bf16 (--include-embeddings "
                            "quantizes them too)")
    write_compressed_run(run, train_config_of(run), model, out_dir, compression, state_for_disk(model))
    report.after.file_bytes = (rundir.latest_checkpoint(out_dir) / rundir.WEIGHTS).stat().st_size
    report.write(out_dir)
    print(format_report(report))
    return report


def quantize_command(o: QuantizeOptions) -> None:
    """``lmforge quantize``: quantize, print the report, say where the new run is."""
    report = quantize_run(o.run, o.out, QuantSpec(o.method, o.group_size, o.include_embeddings), data=o.data or None,
                          windows=o.windows, speed=not o.no_speed, device=o.report_device)
    print(f"\nwrote {report.out} (use it wherever a run directory is accepted)")
