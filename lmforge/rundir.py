"""The run directory: its layout, its ``run.json``, and every question about a run on disk.

A run directory is what ``lmforge train``, ``lmforge finetune`` and ``lmforge import`` write::

    run/
      run.json                      what this run is: kind, task, lora, lmforge version, created
      config.yaml                   the full resolved config (TrainConfig, or FinetuneConfig)
      tokenizer.json                the tokenizer, so a run is self-contained
      dataset_meta.json             pretraining: the prepared dataset's meta.json
      labels.json                   classification: class names in class-id order
      tokenizer_config.json         chat template (SFT runs, imported chat models)
      metrics.jsonl, tb/, loss.png  what the run reported
      final_eval.json               fine-tuning: the final evaluation
      .lock                         locked (flock) by the process writing the run; holds its PID
      checkpoints/
        step_000500/
          model.safetensors         full weights (no pickle), or
          adapter.safetensors       LoRA: only the trained tensors
          trainer.safetensors       optimizer moments + RNG states
          trainer.json              step, optimizer hyper-parameters, best val loss, ...
          manifest.json             size and SHA-256 of every file above, written last
        latest                      names the newest complete checkpoint

Code decides what a run is from ``run.json`` (:func:`read_run_info`), never from which keys or files
happen to be present. Runs written before ``run.json`` existed are recognised once, by
:func:`infer_run_info`.

A checkpoint counts only if it is valid (:func:`checkpoint_problem`): every file its manifest lists
has the recorded size and SHA-256, and every file opens (checkpoints written before manifests
existed are held to the second test only). :func:`latest_checkpoint` takes the newest valid one and
warns about each newer one it skipped, and why.

A run has one writer at a time: every command that writes a run directory (train, finetune, a resume, a
prune's recovery, an app) holds its lock (:func:`lock`), an OS file lock on ``.lock`` that the kernel
releases when the process ends however it ends, so a lock is never stale. A second writer is refused with
the holder's PID (:class:`RunLocked`) before it writes anything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import yaml

from lmforge import __version__
from lmforge.errors import StorageError, UserError

RUN_INFO = "run.json"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
DATASET_META = "dataset_meta.json"
LABELS = "labels.json"
METRICS = "metrics.jsonl"
FINAL_EVAL = "final_eval.json"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
TRAINER_TENSORS = "trainer.safetensors"
TRAINER_STATE = "trainer.json"
MANIFEST = "manifest.json"
LOCK = ".lock"
PREPARED_DATA = "data"
"""Where ``lmforge train`` prepares ``data.sources`` for a run (before the run's own files are written)."""

Kind = Literal["pretrain", "finetune", "imported", "compressed"]
Task = Literal["lm", "mlm", "seq2seq", "sft", "classify", "token_classify"]


def backbone_task(arch: str) -> Task:
    """The task of a model without a task head, from its ``model.arch``: 'lm' (a decoder), 'mlm' (an encoder) or
    'seq2seq' (an encoder-decoder)."""
    return {"decoder": "lm", "encoder": "mlm", "encoder_decoder": "seq2seq"}[arch]


@dataclass(frozen=True)
class RunInfo:
    """The contents of ``run.json``."""

    kind: Kind
    """pretrain (``lmforge train``), finetune (``lmforge finetune``), imported (``lmforge import``) or compressed
    (``lmforge quantize``, ``lmforge prune``)."""
    task: Task
    """What the model was trained for: lm (next token), mlm (masked tokens: an encoder), seq2seq (a target for a
    source: an encoder-decoder, pretrained by denoising or fine-tuned), sft (chat answers), classify (a label per
    text) or token_classify (a label per word)."""
    lora: bool = False
    """Whether checkpoints hold LoRA adapters (the base model's weights are read from the base run)."""
    version: str = __version__
    """The lmforge version that created the run."""
    created: str = ""
    """When the run was created (local time, ISO 8601)."""
    compression: dict | None = None
    """How the model was compressed from another run (``lmforge quantize`` / ``prune``): method, its settings,
    the source; None for an uncompressed run."""


STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}
"""Errors of the storage, not of lmforge: a full disk, a quota, a file-size limit, an I/O error, read-only."""


def _free_space(path: Path) -> str:
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(existing).free
    return f"{free / 2**20:,.0f} MiB free" if free < 2**30 else f"{free / 2**30:,.1f} GiB free"


@contextlib.contextmanager
def storage_errors(path: Path, operation: str, hint: str = "") -> Iterator[None]:
    """Turn a storage failure inside the block into a :class:`StorageError` naming ``path``, the
    operation, the free space (and ``hint``). safetensors reports them as its own errors ("os error N")."""
    try:
        yield
    except Exception as e:
        code = e.errno if isinstance(e, OSError) else next(
            (n for n in STORAGE_ERRNOS if f"(os error {n})" in str(e)), None)
        if code in STORAGE_ERRNOS:
            reason = os.strerror(code)
        elif isinstance(e, OSError) and code is None:  # a short write (numpy's tofile says only that)
            reason = str(e)
        else:
            raise
        raise StorageError(f"{operation} '{path}' failed: {reason} ({_free_space(path)})"
                           + (f"; {hint}" if hint else "")) from e


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries (its renames), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file, an fsync and a rename: after a crash, readers see the
    old text or the new one, never a part."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def write_run_info(run_dir: Path, kind: Kind, task: Task, lora: bool = False,
                   compression: dict | None = None) -> RunInfo:
    """Create ``run.json`` for a new run."""
    info = RunInfo(kind=kind, task=task, lora=lora, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                   compression=compression)
    write_text_atomic(Path(run_dir) / RUN_INFO, json.dumps(asdict(info), indent=1) + "\n")
    return info


def read_run_info(run_dir: Path) -> RunInfo:
    """What the run in ``run_dir`` is: from its ``run.json``, or inferred for an older run."""
    path = Path(run_dir) / RUN_INFO
    if not path.is_file():
        return infer_run_info(run_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RunInfo(**data)
    except (ValueError, TypeError) as e:
        raise UserError(f"'{path}' is not a valid run.json ({e})") from None


def infer_run_info(run_dir: Path) -> RunInfo:
    """The one place that recognises a run written before ``run.json`` existed (lmforge 0.1).

    Such a run is a fine-tuning run if its config has ``task`` and ``base`` (its LoRA flag is
    ``lora.rank > 0``), an import if its only checkpoint has weights and no trainer state, and
    pretraining otherwise. A warning says that it was inferred.
    """
    run_dir = Path(run_dir)
    try:
        config = yaml.safe_load((run_dir / CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"'{run_dir}' has no {RUN_INFO} and no readable {CONFIG} ({e})") from None
    if "task" in config and "base" in config:
        info = RunInfo("finetune", config["task"], lora=(config.get("lora") or {}).get("rank", 0) > 0, version="")
    else:
        ckpts = list_checkpoints(run_dir)
        imported = len(ckpts) == 1 and not (ckpts[0] / TRAINER_STATE).exists()
        info = RunInfo("imported" if imported else "pretrain", "lm", version="")
    warnings.warn(f"'{run_dir}' has no {RUN_INFO} (written by lmforge 0.1): read it as kind={info.kind}, "
                  f"task={info.task}, lora={info.lora}", stacklevel=2)
    return info


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is an lmforge run directory (it has run.json, or config.yaml in older runs)."""
    p = Path(path)
    return (p / RUN_INFO).is_file() or (p / CONFIG).is_file()


def _foreign(path: Path) -> list[str]:
    """The entries of ``path`` that say it is someone else's folder: [] for a run, a new or empty folder, or
    one holding only what a new run writes first (its lock, the data it prepares)."""
    if not path.is_dir() or is_run_dir(path):
        return []
    return sorted(p.name for p in path.iterdir() if p.name not in (LOCK, PREPARED_DATA))


def fresh_run_dir(out_dir: str | Path) -> Path:
    """``out_dir`` if it holds no run yet, else the first free ``out_dir-2``, ``-3``, ... (never overwrite).
    UserError if ``out_dir`` is a file, or a folder that is not a run and not empty (a model downloaded there)."""
    base = Path(out_dir)
    if base.exists() and not base.is_dir():
        raise UserError(f"out_dir '{base}' is a file (expected a run directory to create)")
    foreign = _foreign(base)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"out_dir '{base}' is not an lmforge run and not empty (it holds {shown}): nothing was "
                        f"written; give a new or empty folder")
    candidate, n = base, 1
    while is_run_dir(candidate) or _foreign(candidate) or candidate.is_file():
        busy = being_written(candidate) if is_run_dir(candidate) else None
        if busy is not None:  # two commands training into one out_dir at once: refused, whichever wrote first
            raise busy
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def open_run_dir(out_dir: str | Path, resume: bool) -> tuple[Path, Path | None, RunLock]:
    """(run directory, checkpoint to resume from, its writer's lock): ``out_dir`` and its latest checkpoint when
    resuming, else a fresh directory (see :func:`fresh_run_dir`), created, and no checkpoint. :class:`RunLocked`
    if another process writes the run; nothing is written then."""
    if resume:
        run_dir = Path(out_dir)
        if not run_dir.is_dir():
            raise UserError(f"cannot resume: '{run_dir}' does not exist (expected a run directory)")
        held = lock(run_dir)
        try:
            remove_temporary_checkpoints(run_dir)  # safe now: the lock says nothing else is writing them
            ckpt = latest_checkpoint(run_dir)
            if ckpt is None:
                raise UserError(f"cannot resume: {no_valid_checkpoint(run_dir)}")
        except BaseException:
            held.release()
            raise
        return run_dir, ckpt, held
    while True:
        run_dir = fresh_run_dir(out_dir)
        held = lock(run_dir, create=True)
        if not is_run_dir(run_dir):  # still free once locked (a run may have been written there meanwhile)
            return run_dir, None, held
        held.release()


def run_config_path(run_dir: str | Path) -> Path:
    """The config.yaml of an existing run; UserError if ``run_dir`` is not a run directory."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no {CONFIG})")
    return path


def process_exists(pid: int) -> bool:
    """Whether process ``pid`` is alive (a killed command's temporary output is removed only when it is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


# --------------------------------------------------------------------------------------------------
# The writer's lock


class RunLocked(UserError):
    """Another process (or another thread of this one) is writing the run directory."""


@dataclass
class _Held:
    fd: int
    thread: int
    count: int
    created: Path | None
    """The outermost directory this lock created (the run directory or a parent), or None: what it created is
    removed again if nothing but the lock was written."""


_held: dict[Path, _Held] = {}
_held_guard = threading.Lock()


class RunLock:
    """The lock :func:`lock` took on a run directory; :meth:`release` (or leaving its ``with`` block) gives it up."""

    def __init__(self, run_dir: Path, key: Path):
        self.run_dir, self._key, self._released = run_dir, key, False

    def release(self) -> None:
        """Give the lock up (once; the last release of a re-entered lock unlocks the file)."""
        if self._released:
            return
        self._released = True
        with _held_guard:
            held = _held[self._key]
            held.count -= 1
            if held.count:
                return
            del _held[self._key]
            with contextlib.suppress(OSError):  # nothing written: leave nothing (before unlocking, see lock())
                if held.created in (self._key, *self._key.parents) and {p.name for p in self._key.iterdir()} == {LOCK}:
                    (self._key / LOCK).unlink()
                    for folder in (self._key, *self._key.parents):  # up to the outermost one it created, if empty
                        folder.rmdir()
                        if folder == held.created:
                            break
            os.close(held.fd)  # closing the file is what unlocks it

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *_exc) -> None:
        self.release()


def _locked(run_dir: Path, path: Path) -> RunLocked:
    try:
        pid = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    holder = f"process {pid}" if pid.isdigit() else "another process"
    return RunLocked(f"'{run_dir}' is being written by {holder} (one writer at a time: wait for it to finish, or "
                     f"stop it)")


def being_written(run_dir: str | Path) -> RunLocked | None:
    """The error to raise if another process (or thread) holds ``run_dir``'s lock now, else None; writes nothing."""
    run_dir = Path(run_dir)
    path = run_dir / LOCK
    with _held_guard:
        held = _held.get(run_dir.resolve())
        if held is not None:
            return None if held.thread == threading.get_ident() else \
                RunLocked(f"'{run_dir}' is being written by another thread of this process")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no lock file: nothing that locks has written it
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _locked(run_dir, path)
        finally:
            os.close(fd)
    return None


def lock(run_dir: str | Path, create: bool = False) -> RunLock:
    """Take the writer's lock of ``run_dir`` (see the module docstring) for as long as the returned :class:`RunLock`
    is held (or this process lives); ``create``: make the directory first (a new run).

    Re-entrant in one thread (a command that holds it may call ``train()`` on the same run); raises
    :class:`RunLocked` naming the holder if another process or thread holds it, UserError if the directory
    does not exist (and ``create`` is False)."""
    run_dir = Path(run_dir)
    created = None
    if create and not run_dir.is_dir():
        absolute = run_dir.absolute()
        created = next(p for p in (absolute, *absolute.parents) if p.parent.is_dir())
        with storage_errors(run_dir, "creating"):
            run_dir.mkdir(parents=True, exist_ok=True)
        created = created.resolve()
    elif not run_dir.is_dir():
        raise UserError(f"'{run_dir}' does not exist (expected a run directory)")
    key = run_dir.resolve()
    with _held_guard:
        held = _held.get(key)
        if held is not None:
            if held.thread != threading.get_ident():
                raise RunLocked(f"'{run_dir}' is being written by another thread of this process")
            held.count += 1
            return RunLock(run_dir, key)
        path = key / LOCK
        while True:
            with storage_errors(path, "locking"):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _locked(run_dir, path) from None
            try:  # the file we locked may have been removed by its last holder meanwhile: lock the one there now
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        with contextlib.suppress(OSError):  # the PID only informs a refused writer (a full disk may refuse it)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        _held[key] = _Held(fd, threading.get_ident(), 1, created)
    return RunLock(run_dir, key)


# --------------------------------------------------------------------------------------------------
# Checkpoints


def remove_temporary_checkpoints(run_dir: str | Path) -> None:
    """Remove the ``step_N.tmp`` directories a process that died while writing or rotating checkpoints
    left behind (call it holding the run's :func:`lock`: then nothing else is writing them)."""
    for stale in (Path(run_dir) / CHECKPOINTS).glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def has_weights(ckpt: Path) -> bool:
    """Whether a checkpoint directory holds weights: full (model.safetensors) or LoRA adapters."""
    return (ckpt / WEIGHTS).is_file() or (ckpt / ADAPTER).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint directories of a run, oldest first, valid or not (see :func:`checkpoint_problem`);
    temporary ones being written are not checkpoints."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and not p.name.endswith(".tmp"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Record the size and SHA-256 of every file in checkpoint directory ``ckpt`` (fsync'd, last)."""
    files = sorted(p for p in ckpt.iterdir() if p.is_file() and p.name != MANIFEST)
    for p in files:
        fsync_path(p)
    manifest = {"files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
    write_text_atomic(ckpt / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def _opens(path: Path) -> str | None:
    """Why a checkpoint file cannot be read (safetensors header, JSON), or None if it can."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open  # the header only; no tensors are read

            with safe_open(str(path), framework="numpy") as f:
                f.keys()
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        return f"{path.name} does not open ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def _manifest_files(path: Path) -> dict[str, tuple[int, str]] | None:
    """file name -> (size, SHA-256) as a manifest records them; None if it is not a manifest's shape."""
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        listed = {name: (rec["size"], rec["sha256"]) for name, rec in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, not UTF-8, or another shape
        return None
    shaped = all(isinstance(name, str) and "/" not in name and type(size) is int and isinstance(sha, str)
                 for name, (size, sha) in listed.items())
    return listed if shaped else None


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why checkpoint directory ``ckpt`` cannot be used, or None if it is valid."""
    if not has_weights(ckpt):
        return f"no weights ({WEIGHTS} or {ADAPTER})"
    manifest_path = ckpt / MANIFEST
    if manifest_path.is_file():
        listed = _manifest_files(manifest_path)
        if listed is None:
            return f"{MANIFEST} is damaged"
        for name, (size, sha256) in listed.items():
            path = ckpt / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} bytes, {size} were written"
            if _sha256(path) != sha256:
                return f"{name} does not match its SHA-256"
    for path in sorted(ckpt.iterdir()):
        problem = _opens(path) if path.is_file() and path.name != MANIFEST else None
        if problem:
            return problem
    return None


def _newest_valid(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """(the newest valid checkpoint or None, 'step_N: problem' for each newer one skipped)."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    try:
        named = root / pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else None
    except (OSError, ValueError):  # a damaged pointer: the newest valid checkpoint is found without it
        named = None
    candidates = list_checkpoints(run_dir)[::-1]
    if named in candidates:  # normally the newest anyway
        candidates.remove(named)
        candidates.insert(0, named)
    skipped = []
    for ckpt in candidates:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, skipped
        skipped.append(f"{ckpt.name}: {problem}")
    return None, skipped


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest valid checkpoint (the one ``latest`` names first), warning about each one skipped
    and why; None if there is none (the callers' errors then say what is damaged)."""
    ckpt, skipped = _newest_valid(run_dir)
    for line in skipped if ckpt is not None else []:
        name, problem = line.split(": ", 1)
        warnings.warn(f"skipped checkpoint '{Path(run_dir) / CHECKPOINTS / name}': {problem}", stacklevel=2)
    return ckpt


def no_valid_checkpoint(run_dir: str | Path) -> str:
    """Why a run has no valid checkpoint, for an error message."""
    skipped = _newest_valid(run_dir)[1]
    return f"'{run_dir}' has no valid checkpoint" + (f" ({len(skipped)} damaged; newest {skipped[0]})"
                                                      if skipped else " yet")


def set_latest(ckpt: Path) -> None:
    """Point the run's ``latest`` at checkpoint directory ``ckpt`` (atomically)."""
    write_text_atomic(ckpt.parent / LATEST, ckpt.name)


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(run_dir, checkpoint_dir) for a run directory or one of its checkpoint directories."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"'{p}' does not exist (expected a run directory or a checkpoint directory)")
    if has_weights(p) and p.parent.name == CHECKPOINTS:
        problem = checkpoint_problem(p)
        if problem:
            raise UserError(f"checkpoint '{p}' is damaged: {problem}")
        return p.parent.parent, p
    if is_run_dir(p):
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise UserError(f"run directory {no_valid_checkpoint(p)}")
        return p, ckpt
    raise UserError(f"'{p}' is not a run directory (no {CONFIG}) nor a checkpoint (no {WEIGHTS})")


# --------------------------------------------------------------------------------------------------
# Files of particular runs


def save_labels(run_dir: Path, labels: list[str]) -> None:
    """A classification run's class names, in class-id order."""
    (Path(run_dir) / LABELS).write_text(json.dumps(labels, indent=1) + "\n", encoding="utf-8")


def load_labels(run_dir: Path) -> list[str]:
    path = Path(run_dir) / LABELS
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no {LABELS}: it is not a classification run")
    return json.loads(path.read_text(encoding="utf-8"))


def cache_root() -> Path:
    """Where lmforge caches what it can rebuild (prepared default corpus, measured peak FLOP/s):
    ``$LMFORGE_CACHE``, or ``~/.cache/lmforge``."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")
