"""Checkpoints that survive kills: write under a temporary name, mark complete, rename; prune only after that.

Layout of ``<output_dir>/checkpoints/step_00000100/``:

- ``state/``: Accelerate's ``save_state`` (model, optimizer, per-process RNG); sharded for FSDP/DeepSpeed.
- ``model/``: a Hugging Face model directory (consolidated safetensors, config, tokenizer, modeling code).
- ``trainer_state.json``: step, tokens seen, best validation loss, skipped steps, world size, wall time
  (``run_files.TrainerState``).
- ``data_state.json``: every rank's data position.
- ``recipe.yaml``: the resolved recipe of the run that wrote it.
- ``MANIFEST.json``: size and xxh3-64 hash of every file above, written after them and before ``COMPLETE``.
- ``COMPLETE``: written last, after everything else is on disk; a directory without it is never resumed from.

Before a resume, :func:`verify` re-checks the manifest (and the layout); a checkpoint that fails is renamed
``step_XXXXXXXX.corrupt`` (kept, never picked again) and the newest intact one is used. :func:`check_pickles`
refuses any pickle-based state file that would import more than tensors, containers and RNG states, so resume never
runs code from a checkpoint, whichever library (Accelerate, DeepSpeed, torch DCP) then loads the file.

Multi-node runs need ``output_dir`` on a filesystem every node sees (each process writes its own state files).
"""

from __future__ import annotations

import json
import logging
import os
import pickletools
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text, write_json  # noqa: F401  (ckpt.write_json: used by the trainer)
from .atomic import fsync_dir as _fsync_dir
from .run_files import METRICS, RECIPE, RUN_INFO, TRAINER_STATE, read_trainer_state

logger = logging.getLogger("gpt2_accel")

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
CORRUPT = ".corrupt"
_STEP_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Committed checkpoints of a run, oldest first. Half-written ones (no COMPLETE marker) are ignored."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = complete_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def staging_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (main process only)."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a save that was killed; never a committed checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int) -> Path:
    """Record the manifest, mark ``tmp`` complete and rename it to its final name (main process only, after all
    ranks wrote)."""
    final = tmp.parent / checkpoint_name(step)
    write_manifest(tmp)
    write_json(tmp / COMPLETE, {"step": step})
    _fsync_dir(tmp)
    if final.exists():
        if verify(final).ok:
            # Same step saved again (e.g. preempted right after a resume, or a clock that jumped back): the committed
            # one is equivalent; keep it, never overwrite a committed checkpoint.
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        quarantine(final)  # a damaged one with our name: keep it aside, commit the new one in its place
    os.rename(tmp, final)  # atomic on POSIX: the checkpoint appears complete or not at all
    _fsync_dir(final.parent)
    return final


def prune(
    output_dir: str | os.PathLike, keep_last: int | None, keep_steps: set[int] = frozenset()
) -> list[Path]:
    """Delete committed checkpoints beyond the newest ``keep_last``, never those in ``keep_steps`` (the best).

    Called only after a new checkpoint is committed, so the newest good one always survives.
    """
    if keep_last is None:
        return []
    ckpts = complete_checkpoints(output_dir)
    removed = []
    for step, path in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if step in keep_steps:
            continue
        # Remove the marker first: a kill in the middle of rmtree leaves a directory resume will ignore.
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# Keys that must match to resume: they change what the model is or what data it sees.
RESUME_MUST_MATCH = (
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "vocab_size",
    "pad_vocab_size_multiple",
    "bias",
    "attn_type",
    "dataset_name",
    "dataset_config_name",
    "dataset_weights",
    "text_column",
    "train_split",
    "validation_split",
    "validation_dataset_name",
    "validation_split_percentage",
    "tokenizer_name",
    "block_size",
    "shuffle_buffer_size",
    "seed",
)


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of the must-match keys whose values differ between two flat recipes."""
    diffs = []
    for key in RESUME_MUST_MATCH:
        if key in saved and saved.get(key) != current.get(key):
            diffs.append(f"{key}: checkpoint {saved.get(key)!r} != recipe {current.get(key)!r}")
    return diffs


# ---------------------------------------------------------------------------------------------------------------
# verification: a manifest of sizes and hashes, the expected layout, and no code in pickles
# ---------------------------------------------------------------------------------------------------------------
# xxh3-64: ~10x the speed of blake2b and ~3x zlib.crc32 here (benchmarks/bench_checkpoint_verify.py); it detects
# truncation, bit rot and partial copies, not tampering (a forger rewrites the manifest too: check_pickles is what
# keeps code out). xxhash is a dependency of datasets, so it is always installed with us.
HASH = "xxh3_64"
# Files resume needs besides the state directory; a COMPLETE marker without them is a damaged checkpoint. The model
# export is a full model (config.json) or, for a LoRA run, a PEFT adapter (adapter_config.json).
REQUIRED = (TRAINER_STATE, "data_state.json")
MODEL_EXPORT = ("model/config.json", "model/adapter_config.json")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from safely (the message names the file and the fix)."""


def file_hash(path: str | os.PathLike) -> str:
    """xxh3-64 of a file's bytes, hashed from a memory map (no copy: ~3x the speed of read() here)."""
    import mmap

    import xxhash

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return xxhash.xxh3_64(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return xxhash.xxh3_64(m).hexdigest()


def _payload_files(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name not in (COMPLETE, MANIFEST))


def write_manifest(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Record size and hash of every file of a (staged) checkpoint in ``MANIFEST.json``; return the manifest."""
    ckpt_dir = Path(ckpt_dir)
    files = {
        p.relative_to(ckpt_dir).as_posix(): {"size": p.stat().st_size, HASH: file_hash(p)}
        for p in _payload_files(ckpt_dir)
    }
    manifest = {"format": 1, "hash": HASH, "files": files}
    write_json(ckpt_dir / MANIFEST, manifest)
    return manifest


@dataclass
class Verification:
    """The outcome of :func:`verify`: ``ok`` (resumable), ``problems`` (each names a file) and whether hashes were
    checked (``manifest`` False: a checkpoint written before manifests existed, checked for its layout only)."""

    path: Path
    ok: bool = True
    manifest: bool = True
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if not self.ok:
            return "CORRUPT: " + "; ".join(self.problems)
        return "ok" if self.manifest else "ok (no manifest: layout checked, no hashes)"


def verify(ckpt_dir: str | os.PathLike, *, hashes: bool = True) -> Verification:
    """Check a committed checkpoint: its COMPLETE marker names its step, the files resume reads exist, and every file
    in the manifest has its recorded size and (``hashes``) hash. Reads, never writes."""
    ckpt_dir = Path(ckpt_dir)
    v = Verification(ckpt_dir)
    bad = v.problems.append
    try:
        marker = read_json(ckpt_dir / COMPLETE)
        m = _STEP_RE.match(ckpt_dir.name)
        if m and isinstance(marker, dict) and marker.get("step") not in (None, int(m.group(1))):
            bad(
                f"{COMPLETE} says step {marker.get('step')} but the directory is {ckpt_dir.name} (renamed by hand?)"
            )
    except (OSError, ValueError) as e:
        bad(f"{COMPLETE}: unreadable ({e})")
    for rel in REQUIRED:
        if not (ckpt_dir / rel).is_file():
            bad(f"{rel}: missing")
    if not any((ckpt_dir / rel).is_file() for rel in MODEL_EXPORT):
        bad(f"{' or '.join(MODEL_EXPORT)}: missing")
    state = ckpt_dir / "state"
    if not state.is_dir() or not any(p.is_file() for p in state.rglob("*")):
        bad("state/: missing or empty")
    if not (ckpt_dir / MANIFEST).is_file():
        v.manifest = False
    else:
        try:
            manifest = read_json(ckpt_dir / MANIFEST)
            files = manifest["files"]
            algo = manifest.get("hash", HASH)
        except (OSError, ValueError, KeyError, TypeError) as e:
            bad(f"{MANIFEST}: unreadable ({e})")
            files, algo = {}, HASH
        if algo != HASH:
            bad(f"{MANIFEST}: unknown hash {algo!r}")
            files = {}
        for rel, want in files.items():
            p = ckpt_dir / rel
            if not p.is_file():
                bad(f"{rel}: missing")
                continue
            size = p.stat().st_size
            if size != want["size"]:
                bad(f"{rel}: {size} bytes, the manifest says {want['size']} (truncated or partly copied)")
            elif hashes and file_hash(p) != want[HASH]:
                bad(f"{rel}: content differs from the manifest's {HASH} (damaged on disk or edited)")
    v.ok = not v.problems
    return v


def quarantine(ckpt_dir: str | os.PathLike) -> Path:
    """Rename a damaged checkpoint ``step_N`` to ``step_N.corrupt`` (``.corrupt-2``...): kept for inspection, never
    picked again, never deleted."""
    ckpt_dir = Path(ckpt_dir)
    target, i = ckpt_dir.with_name(ckpt_dir.name + CORRUPT), 1
    while target.exists():
        i += 1
        target = ckpt_dir.with_name(f"{ckpt_dir.name}{CORRUPT}-{i}")
    os.rename(ckpt_dir, target)
    _fsync_dir(target.parent)
    return target


def newest_intact_checkpoint(
    output_dir: str | os.PathLike,
) -> tuple[Path | None, list[tuple[Path, Verification]]]:
    """The newest committed checkpoint that passes :func:`verify` (main process only: it renames the ones that fail,
    logging a warning that names the file and what is wrong). Returns it and the list of (renamed to, verification)."""
    skipped = []
    for _, path in reversed(complete_checkpoints(output_dir)):
        v = verify(path)
        if v.ok:
            if not v.manifest:
                logger.info(
                    "checkpoint %s has no manifest (older gpt2_accel): layout checked, no hashes", path
                )
            return path, skipped
        moved = quarantine(path)
        logger.warning(
            "checkpoint %s is damaged and was skipped: %s. Kept as %s; delete it once inspected",
            path, "; ".join(v.problems), moved,
        )  # fmt: skip
        skipped.append((moved, v))
    return None, skipped


# Every global a pickle in a resumable state may import: tensors and their storages, plain containers, numpy
# arrays (the RNG states), and the metadata classes of Accelerate, DeepSpeed and torch.distributed.checkpoint.
# Anything else (``os.system``, ``builtins.eval``, ``subprocess.Popen``...) means the file could run code when
# unpickled: refused before any library loads it. DeepSpeed loads its files with weights_only=False and torch DCP
# unpickles ``.metadata`` with plain pickle, so Accelerate's own weights_only=True default is not enough.
SAFE_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
        ("builtins", "bytearray"),
        ("_codecs", "encode"),  # how protocol-2 pickles spell bytes
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._tensor", "_rebuild_from_type_v2"),  # DeepSpeed's optimizer shards (its args are checked too)
        ("torch", "Tensor"),
        ("torch.nn.parameter", "Parameter"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch", "dtype"),
        ("torch", "layout"),
        ("torch", "memory_format"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # torch DCP's .metadata (FSDP2): storage layout records and the path they were written to
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        # DeepSpeed ZeRO 1/2/3 model and optimizer states (0.19)
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    }
)
# Whole modules whose every name is a data class or an enum, not behaviour.
SAFE_MODULE_PREFIXES = ("numpy.dtypes", "torch.distributed.checkpoint.metadata")
_TORCH_DTYPES = {
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool", "complex64",
    "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
}  # fmt: skip
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}


def _allowed(module: str, name: str) -> bool:
    if (module, name) in SAFE_GLOBALS:
        return True
    if module == "torch" and (name in _TORCH_DTYPES or name.endswith("Storage")):
        return True
    return module.startswith(SAFE_MODULE_PREFIXES)


def pickle_globals(data: bytes) -> list[tuple[str, str]]:
    """The (module, name) pairs a pickle imports, read from its opcodes without unpickling anything. A global whose
    name is not a literal string (a pickle built to hide it) is reported as ("?", "?")."""
    found: list[tuple[str, str]] = []
    memo: dict[int, Any] = {}
    recent: list[Any] = []  # values the last opcodes pushed (strings only; None for anything else)
    for op, arg, _ in pickletools.genops(data):
        name = op.name
        if name in _STRING_OPS:
            recent.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = recent[-1] if recent else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(int(arg)))
        elif name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append((module, attr))
            recent.append(None)
        elif name == "STACK_GLOBAL":
            pair = recent[-2:]
            ok = len(pair) == 2 and all(isinstance(x, str) for x in pair)
            found.append((pair[0], pair[1]) if ok else ("?", "?"))
            recent.append(None)
        elif name in ("EXT1", "EXT2", "EXT4"):  # the copyreg extension registry: an import by number
            found.append(("?", f"extension {arg}"))
            recent.append(None)
        else:
            recent.append(None)
        del recent[:-2]
    return found


def _pickles_in(path: Path) -> list[tuple[str, bytes]]:
    """The pickles inside a state file: each ``*.pkl`` member of a torch zip file, or the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return [(f"{path.name}:{n}", z.read(n)) for n in z.namelist() if n.endswith(".pkl")]
    return [(path.name, path.read_bytes())]


# What resume unpickles: Accelerate's optimizer/RNG/scheduler files, DeepSpeed's *_states.pt, DCP's .metadata.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".metadata")


def check_pickles(state_dir: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` if any pickle-based file under ``state_dir`` imports a global outside
    :data:`SAFE_GLOBALS` (i.e. could run code when loaded). Reads the pickles' opcodes, not the tensor data."""
    state_dir = Path(state_dir)
    for path in sorted(p for p in state_dir.rglob("*") if p.is_file() and p.name.endswith(PICKLE_SUFFIXES)):
        try:
            pickles = _pickles_in(path)
            refs = [(label, g) for label, data in pickles for g in pickle_globals(data)]
        except Exception as e:  # not a pickle at all (truncated, garbage): also nothing we will load
            raise CheckpointError(
                f"{path}: not a readable pickle ({e.__class__.__name__}: {e}); the checkpoint is damaged. Resume from "
                "another checkpoint (move this one aside) or start over with overwrite_output_dir=true"
            ) from None
        bad = sorted({f"{m}.{n}" for _, (m, n) in refs if not _allowed(m, n)})
        if bad:
            raise CheckpointError(
                f"{path} would import {', '.join(bad)} when loaded: a resumable state holds only tensors, containers "
                "and RNG states, so this file may run code. Refusing to load it. If you did not put it there, treat "
                "the run directory as compromised; otherwise resume from a checkpoint this run wrote"
            )


def check_output_dir(output_dir: str | os.PathLike, lock_name: str) -> None:
    """Refuse an ``output_dir`` that holds files but none a gpt2_accel run writes (a home directory, a dataset, a
    transformers Trainer run): nothing there is ours to resume from or write over. Reads only."""
    out = Path(output_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError(f"output_dir {str(out)!r} is a file, not a directory; choose a directory path")
    entries = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    ours = {CHECKPOINTS, RECIPE, METRICS, RUN_INFO, "model.safetensors"}
    if entries and not ours.intersection(entries) and not (out / lock_name).exists():
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise CheckpointError(
            f"output_dir {str(out)!r} holds files no gpt2_accel run wrote ({shown}); point output_dir at a new or "
            "empty directory, or at a previous run of ours to resume it. Nothing there was changed"
        )
    root = out / CHECKPOINTS
    if root.is_dir():
        odd = [
            p.name
            for p in root.iterdir()
            if not (_STEP_RE.match(p.name) or p.name.startswith(".tmp-") or CORRUPT in p.name)
        ]
        if odd:
            logger.warning(
                "%s holds entries gpt2_accel did not write (%s): they are ignored (resume reads step_XXXXXXXX only)",
                root, ", ".join(sorted(odd)[:5]),
            )  # fmt: skip


def check_writable(output_dir: str | os.PathLike) -> None:
    """Fail now, not at the first save hours later, if the run directory or its checkpoints cannot be written.

    A real probe (create and remove a file) rather than ``os.access``: root passes ``os.access`` on any mode, yet
    an immutable (``chattr +i``) or read-only-mounted directory still refuses root's writes."""
    import tempfile

    for d in (Path(output_dir), Path(output_dir) / CHECKPOINTS):
        if not d.is_dir():
            continue
        try:
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise CheckpointError(
                f"cannot write to {str(d)!r} ({e.strerror}): the run could not save checkpoints there. Fix its "
                f"permissions (e.g. `chmod -R u+w {d}`, `chattr -i`, a read-write mount) or choose another output_dir"
            ) from None


def check_state_shapes(state_dir: str | os.PathLike, expected: dict[str, tuple[int, ...]]) -> None:
    """Compare the tensor shapes of ``state/model.safetensors`` (DDP/single-process checkpoints) with the model about
    to receive them; a checkpoint of another model shape fails here, naming the file, not deep in load_state."""
    path = Path(state_dir) / "model.safetensors"
    if not path.is_file():
        return  # sharded (DeepSpeed/FSDP) states: their loaders check shapes per shard
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    wrong = [f"{k}: {got[k]} vs model {v}" for k, v in expected.items() if k in got and got[k] != v]
    if wrong:
        raise CheckpointError(
            f"{path} holds a model of another shape ({'; '.join(wrong[:3])}). Resume it with its own recipe (see the "
            "checkpoint's recipe.yaml) or use another output_dir"
        )


# ---------------------------------------------------------------------------------------------------------------
# listing (`gpt2-accel checkpoints`)
# ---------------------------------------------------------------------------------------------------------------
def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _val_loss(path: Path, step: int) -> float | None:
    """The validation loss measured at this checkpoint's step, if the run evaluated there."""
    try:
        last = read_trainer_state(path).last_eval or {}
    except (OSError, ValueError, TypeError):
        return None
    return last.get("val_loss") if last.get("step") == step else None


def list_checkpoints(run_dir: str | Path, *, hashes: bool = True) -> list[dict[str, Any]]:
    """One row per checkpoint directory (committed, damaged and renamed, or never completed), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    rows = []
    committed = complete_checkpoints(run_dir)
    resume = None
    for step, path in committed:
        v = verify(path, hashes=hashes)
        rows.append({"step": step, "path": str(path), "val_loss": _val_loss(path, step), "size": _size(path),
                     "ok": v.ok, "status": v.status})  # fmt: skip
        if v.ok:
            resume = len(rows) - 1
    if resume is not None:
        rows[resume]["resume"] = True
    names = {p.name for _, p in committed}
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.name in names or not p.is_dir():
            continue
        if CORRUPT in p.name:
            status = "damaged, renamed aside by a resume (kept for inspection; delete when done)"
        elif p.name.startswith(".tmp-"):
            status = "incomplete save (no COMPLETE marker; removed by the next save)"
        else:
            status = "no COMPLETE marker: never resumed from"
        digits = "".join(c for c in p.name.split(".")[0 if not p.name.startswith(".") else 1] if c.isdigit())
        rows.append({"step": int(digits) if digits else None, "path": str(p), "val_loss": None, "size": _size(p),
                     "ok": None, "status": status})  # fmt: skip
    return rows
