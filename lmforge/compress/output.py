"""A compressed model's run directory, written whole or not at all.

``lmforge quantize`` and ``lmforge prune`` write a new run directory (``run.json`` of kind ``compressed``
naming the method and the source, ``config.yaml``, the tokenizer, the chat template if the source has one,
one checkpoint of step 0, the report) into a temporary folder next to ``--out``, renamed into place at the
end: a failure leaves nothing behind. Every command that reads a run directory reads it.
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge import rundir
from lmforge.chat import ChatTemplate, find_chat_template
from lmforge.config import TrainConfig, save_yaml
from lmforge.errors import UserError
from lmforge.interop import check_new_folder, temporary_sibling
from lmforge.loading import LoadedRun
from lmforge.training.checkpoint import save_weights_only


def source_task(run: LoadedRun) -> rundir.Task:
    """'sft' for a chat fine-tuned source (its template comes along), else 'lm'."""
    if rundir.is_run_dir(run.folder) and rundir.read_run_info(run.folder).task == "sft":
        return "sft"
    return "lm"


def source_weights(run: LoadedRun) -> Path | None:
    """The source's weights file (for its size), if it is one file."""
    path = run.checkpoint / rundir.WEIGHTS if run.checkpoint.is_dir() else None
    return path if path is not None and path.is_file() else None


def write_compressed_run(run: LoadedRun, cfg: TrainConfig, model: torch.nn.Module, out: Path, compression: dict,
                         tensors: dict[str, torch.Tensor] | None = None,
                         extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (or ``tensors``, its stored form) as the new run directory ``out``; returns it.

    extra(folder) adds the command's own files (a pruning mask, the report) before the folder is moved in place.
    """
    check_new_folder(out)
    tmp = temporary_sibling(out)
    try:
        tmp.mkdir(parents=True)
        cfg.out_dir = str(out)
        save_yaml(cfg, tmp / rundir.CONFIG)
        run.tokenizer.save(tmp / rundir.TOKENIZER)
        template = find_chat_template(run.folder)
        if template is not None:
            ChatTemplate(template[0], run.tokenizer, template[1]).save(tmp)
        meta = run.folder / rundir.DATASET_META
        if meta.is_file():
            shutil.copyfile(meta, tmp / rundir.DATASET_META)
        save_weights_only(tmp, 0, model, tensors)
        if extra is not None:
            extra(tmp)
        rundir.write_run_info(tmp, "compressed", source_task(run), compression=compression)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``, which must still be absent or empty: another command writing the same
    ``--out`` meanwhile (two prunes at once) finishes first and keeps its folder; this one is refused in one line."""
    try:
        if out.exists():  # an empty folder (check_new_folder allows it), unless written meanwhile
            out.rmdir()
        os.rename(tmp, out)  # onto a folder written meanwhile: ENOTEMPTY, never a merge
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise UserError(f"--out '{out}' was written by another command meanwhile: nothing was overwritten (give "
                        f"another --out)") from None


def train_config_of(run: LoadedRun) -> TrainConfig:
    """A TrainConfig for the compressed run: the source's own, or (fine-tuned, imported) just its model."""
    if isinstance(run.config, TrainConfig):
        return copy.deepcopy(run.config)
    return TrainConfig(model=copy.deepcopy(run.config.model))
