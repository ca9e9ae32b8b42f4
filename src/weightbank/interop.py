"""Lossless import from, and export to, the files the rest of the world uses.

``import_file`` takes a ``.safetensors`` file, a torch file (``.pt``,
``.pth``, ``.bin``) or a Hugging Face model directory and saves it as one
checkpoint; ``export`` writes a checkpoint out as ``.safetensors`` or ``.pt``.
Every dtype and every bit is kept both ways.

Torch files are read with ``torch.load(weights_only=True)`` only: a file that
needs pickle to rebuild arbitrary objects is refused, never loaded unsafely.
A file is read completely before anything is saved, so a bad file leaves the
bank untouched; an export is written to a temporary file beside the target,
fsynced, then renamed, so a reader never sees half an export.

Example:
    >>> import tempfile, pathlib, torch, weightbank as wb
    >>> from weightbank.interop import export, import_file
    >>> bank, tmp = wb.open("memory://"), pathlib.Path(tempfile.mkdtemp())
    >>> _ = bank.save({"w": torch.ones(2)}, tags=["v1"])
    >>> out = export(bank, "v1", tmp / "w.safetensors")
    >>> import_file(bank, out, run="copy").meta["imported_from"]["format"]
    'safetensors'
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file as safetensors_save_file

from .bank.bank import AUTO, Auto, Bank
from .bank.results import CheckpointInfo, SaveResult
from .errors import ExternalFileError, ExternalFileNotFound, IncompatibleState, InvalidState, TargetExists
from .format.lossy import LOSSY_CODECS, quantizable, quantize_tensor
from .format.tree import flatten
from .storage.durable import fsync_dir

__all__ = ["TORCH_SUFFIXES", "export", "import_file"]

#: File suffixes read as torch files (``torch.load(weights_only=True)``).
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

# Safetensors ``__metadata__`` key under which an export lists the names that
# shared storage with an earlier tensor (safetensors cannot store sharing).
_ALIASES_KEY = "weightbank_aliases"

# Errors a third-party parser raises on a damaged or foreign file. MemoryError
# and KeyboardInterrupt are deliberately not among them.
_PARSE_ERRORS = (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError, EOFError)

_UNSAFE_GLOBAL = re.compile(r"Unsupported (?:global: GLOBAL |class )([\w.]+)")


# -- import ---------------------------------------------------------------------------------


def import_file(
    bank: Bank,
    path: str | os.PathLike[str],
    *,
    run: str = "main",
    step: int | None = None,
    tags: Iterable[str] = (),
    message: str = "",
    metrics: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    parent: str | Auto | None = AUTO,
) -> SaveResult:
    """Save the weights in ``path`` as a new checkpoint of ``run`` and return its info.

    ``path`` is a ``.safetensors`` file (its ``__metadata__`` goes to
    ``meta["safetensors_metadata"]``), a torch file (``.pt``/``.pth``/``.bin``,
    whose structure is kept as-is), or a Hugging Face model directory (its
    weight shards merged into one flat state dict, ``config.json`` merged under
    ``config``, with ``config`` winning). ``meta["imported_from"]`` records the
    source name and format. Tensors a weightbank export recorded as aliases are
    tied again. Nothing is written unless the whole source reads cleanly.

    Raises ExternalFileNotFound for a missing source, ExternalFileError for an
    unknown or damaged one, and InvalidState for a torch file that needs
    pickle of arbitrary objects.

    Example:
        >>> import tempfile, pathlib, torch, weightbank as wb
        >>> from weightbank.interop import import_file
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "sd.pt"
        >>> torch.save({"w": torch.arange(3)}, p)
        >>> bank = wb.open("memory://")
        >>> info = import_file(bank, p, run="ext", step=1)
        >>> bank.load(info.id)["w"].tolist(), info.meta["imported_from"]
        ([0, 1, 2], {'file': 'sd.pt', 'format': 'torch'})
    """
    src = Path(path)
    if not src.exists():
        raise ExternalFileNotFound(src, f"cannot import {src}: it does not exist")
    meta: dict[str, Any] = {}
    merged_config = dict(config or {})
    state: Any
    if src.is_dir():
        state, file_config, meta = _read_hf_dir(src)
        merged_config = {**file_config, **merged_config}
    elif src.suffix.lower() == ".safetensors":
        state, st_meta = _read_safetensors(src)
        meta = {
            "imported_from": {"file": src.name, "format": "safetensors"},
            "safetensors_metadata": st_meta,
        }
    elif src.suffix.lower() in TORCH_SUFFIXES:
        state = _read_torch(src)
        meta = {"imported_from": {"file": src.name, "format": "torch"}}
    else:
        raise ExternalFileError(
            src,
            f"cannot import {src}: unknown file type {src.suffix!r}; expected .safetensors, "
            f"{', '.join(TORCH_SUFFIXES)} or a Hugging Face model directory",
        )
    return bank.save(
        state,
        run=run,
        step=step,
        metrics=metrics,
        config=merged_config,
        tags=tags,
        message=message,
        meta=meta,
        parent=parent,
    )


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (aliases re-tied) and its ``__metadata__``."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except _PARSE_ERRORS as e:
        raise ExternalFileError(path, f"cannot import {path}: not a readable safetensors file ({e})") from e
    _retie(tensors, metadata.get(_ALIASES_KEY))
    return tensors, metadata


def _retie(tensors: dict[str, torch.Tensor], aliases_json: str | None) -> None:
    """Make each recorded alias the very tensor it aliases again, if their bytes agree.

    A hand-edited file may list aliases that no longer match; those stay separate.
    """
    if not aliases_json:
        return
    try:
        aliases = json.loads(aliases_json)
    except ValueError:
        return
    if not isinstance(aliases, dict):
        return
    for name, base in aliases.items():
        a, b = tensors.get(name), tensors.get(str(base))
        if a is None or b is None or a is b:
            continue
        if a.dtype == b.dtype and a.shape == b.shape and _same_bytes(a, b):
            tensors[name] = b


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def _read_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)``; never anything less safe."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many unrelated types for a damaged file
        if isinstance(e, MemoryError):
            raise
        unsafe = _UNSAFE_GLOBAL.search(str(e))
        if unsafe:
            raise InvalidState(
                str(path),
                f"the file needs pickle to rebuild {unsafe.group(1)}, which weightbank never runs "
                "(it could execute arbitrary code); in a trusted environment re-save only the tensors, "
                "e.g. torch.save(model.state_dict(), path), or save them as .safetensors",
            ) from e
        raise ExternalFileError(
            path, f"cannot import {path}: not a readable torch file ({_first_line(e)})"
        ) from e


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


# -- Hugging Face model directories -----------------------------------------------------------


def _read_hf_dir(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """The merged flat state dict, the parsed ``config.json`` and the meta of a model directory."""
    shards, index_meta = _weight_files(root, "*.safetensors")
    fmt = "safetensors"
    if not shards:
        shards, index_meta = _weight_files(root, "pytorch_model*.bin")
        fmt = "torch"
    if not shards:
        raise ExternalFileError(
            root,
            f"cannot import {root}: the directory holds no weights "
            "(no *.safetensors and no pytorch_model*.bin at its top level)",
        )
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    st_meta: dict[str, dict[str, str]] = {}
    for shard in shards:
        if fmt == "safetensors":
            tensors, st_meta[shard.name] = _read_safetensors(shard)
        else:
            tensors = _flat_tensor_dict(_read_torch(shard), shard)
        dups = sorted(set(tensors) & set(state))
        if dups:
            raise ExternalFileError(
                root,
                f"cannot import {root}: {len(dups)} tensor name(s) appear in more than one weight file, "
                f"e.g. {dups[0]!r} in {origin[dups[0]]} and {shard.name}; remove the extra file(s) "
                "or add a *.index.json weight_map naming the right one",
                dups,
            )
        for name in tensors:
            origin[name] = shard.name
        state.update(tensors)
    _check_index(root, index_meta, origin)

    config: dict[str, Any] = {}
    config_file = root / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExternalFileError(root, f"cannot import {root}: config.json is not valid JSON ({e})") from e
        if not isinstance(config, dict):
            raise ExternalFileError(root, f"cannot import {root}: config.json holds no JSON object")

    weight_names = {s.name for s in shards}
    meta: dict[str, Any] = {
        "imported_from": {
            "file": root.name,
            "format": "huggingface",
            "weights": [s.name for s in shards],
            "weights_format": fmt,
        },
        "hf_files": _other_files(root, weight_names),
    }
    if index_meta.get("metadata"):
        meta["hf_index_metadata"] = index_meta["metadata"]
    if st_meta:
        distinct = {json.dumps(m, sort_keys=True) for m in st_meta.values()}
        if len(distinct) == 1:
            meta["safetensors_metadata"] = next(iter(st_meta.values()))
        else:
            meta["safetensors_metadata_by_file"] = st_meta
    return state, config, meta


def _weight_files(root: Path, pattern: str) -> tuple[list[Path], dict[str, Any]]:
    """The weight files to read (from a ``*.index.json`` weight_map when there is one) and that index."""
    suffix = pattern.rsplit(".", 1)[-1]
    indexes = sorted(root.glob(f"*.{suffix}.index.json"))
    if not indexes:
        return sorted(p for p in root.glob(pattern) if p.is_file()), {}
    weight_map: dict[str, str] = {}
    index_meta: dict[str, Any] = {}
    for index in indexes:
        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
            wm = doc["weight_map"]
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise TypeError("weight_map must map tensor names to file names")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExternalFileError(
                root, f"cannot import {root}: {index.name} is not a valid index ({e})"
            ) from e
        for name, file in wm.items():
            if weight_map.setdefault(name, file) != file:
                raise ExternalFileError(
                    root, f"cannot import {root}: the index files disagree on where {name!r} lives", [name]
                )
        if isinstance(doc.get("metadata"), dict):
            index_meta.setdefault("metadata", {}).update(doc["metadata"])
    index_meta["weight_map"] = weight_map
    files: list[Path] = []
    for file in dict.fromkeys(weight_map.values()):
        shard = root / file
        if Path(file).is_absolute() or ".." in Path(file).parts or not shard.is_file():
            raise ExternalFileError(
                root,
                f"cannot import {root}: the index names weight file {file!r}, which is not in the directory",
            )
        files.append(shard)
    return files, index_meta


def _check_index(root: Path, index_meta: Mapping[str, Any], origin: Mapping[str, str]) -> None:
    weight_map: Mapping[str, str] = index_meta.get("weight_map", {})
    wrong = [name for name, file in weight_map.items() if origin.get(name) != Path(file).name]
    if wrong:
        name = wrong[0]
        where = origin.get(name)
        found = f"found in {where}" if where else "found in no weight file"
        raise ExternalFileError(
            root,
            f"cannot import {root}: the index puts {name!r} in {weight_map[name]} but it was {found}"
            + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""),
            wrong,
        )


def _flat_tensor_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ExternalFileError(
            path,
            f"cannot import {path}: a model-directory weight file must hold a flat dict of named tensors",
        )
    return dict(obj)


def _other_files(root: Path, weight_names: set[str]) -> dict[str, int]:
    """Relative path -> size of every non-weight file (hidden files and folders skipped)."""
    out: dict[str, int] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if rel.as_posix() in weight_names or p.name.endswith(".index.json"):
            continue
        out[rel.as_posix()] = p.stat().st_size
    return out


# -- export ---------------------------------------------------------------------------------


def export(
    bank: Bank,
    ref: str,
    out_path: str | os.PathLike[str],
    *,
    select: str | Sequence[str] | None = None,
    overwrite: bool = False,
    quantize: str | None = None,
) -> Path:
    """Write checkpoint ``ref`` (or its ``select``-ed tensors) to ``out_path``; return the path.

    ``.safetensors``: the checkpoint must be a flat dict of named tensors, or
    ``select`` must pick tensors (they are written under their dotted names);
    tensors sharing storage are written once each and listed under
    ``weightbank_aliases`` in the header, beside ``weightbank_id``,
    ``weightbank_run`` and ``weightbank_step`` and any metadata the checkpoint
    was imported with. ``.pt``: ``torch.save`` of the loaded state, readable
    with ``torch.load(weights_only=True)`` (numpy leaves become tensors). The
    file appears whole or not at all; an existing file is replaced only with
    ``overwrite=True``.

    ``quantize="int8"`` or ``"fp8"`` (lossy, only when asked) writes each float
    tensor of 2+ dims as codes (int8 / float8_e4m3fn) plus
    ``<name>.weightbank_scale`` (float32, one scale per output channel, so
    ``codes.float() * scale`` restores it); the measured max-abs and relative
    error of each is listed as JSON under ``weightbank_quantized`` (safetensors
    metadata, or a ``.pt`` key). The state must then be a flat dict of tensors.

    Example:
        >>> import tempfile, pathlib, torch, weightbank as wb
        >>> from weightbank.interop import export
        >>> bank = wb.open("memory://"); _ = bank.save({"w": torch.ones(2)}, run="r", step=3)
        >>> out = export(bank, "r@3", pathlib.Path(tempfile.mkdtemp()) / "w.pt")
        >>> torch.load(out, weights_only=True)["w"].tolist()
        [1.0, 1.0]
    """
    out = Path(out_path)
    kind = out.suffix.lower()
    if kind not in (".safetensors", ".pt"):
        raise ExternalFileError(
            out, f"cannot export to {out}: unknown file type {out.suffix!r}; use .safetensors or .pt"
        )
    if quantize is not None and quantize not in LOSSY_CODECS:
        raise ExternalFileError(
            out,
            f"cannot export to {out}: unknown quantization {quantize!r}; use one of {', '.join(LOSSY_CODECS)}",
        )
    _check_target(out, overwrite)
    cid = bank.resolve(ref)
    state = bank.load(cid, select=select)
    quantized: dict[str, Any] = {}
    if quantize is not None:
        state, quantized = _quantized(state, cid, quantize)
    if kind == ".safetensors":
        info = bank.info(cid)
        tensors, aliases = _safetensors_tensors(state, cid, selected=select is not None)
        metadata = _safetensors_metadata(info, aliases)
        if quantized:
            metadata["weightbank_quantized"] = json.dumps(quantized, sort_keys=True)

        def write(tmp: Path) -> None:
            safetensors_save_file(tensors, str(tmp), metadata=metadata)

    else:
        plain = _numpy_to_torch(state)
        if quantized:
            plain["weightbank_quantized"] = json.dumps(quantized, sort_keys=True)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:
                torch.save(plain, f)

    _atomic_write(out, write, overwrite=overwrite)
    return out


def _quantized(state: Any, cid: str, method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The state with float matrices replaced by codes + scales, and each one's measured error."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise IncompatibleState(
            f"checkpoint {cid[:12]} is not a flat dict of named tensors; quantized exports need one "
            "(pick tensors with select=)"
        )
    out: dict[str, Any] = {}
    errors: dict[str, Any] = {}
    for name, value in state.items():
        t = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
        if isinstance(t, torch.Tensor) and quantizable(t) and bool(torch.isfinite(t).all()):
            codes, scale, errors[name] = quantize_tensor(t, method)
            out[name] = codes
            out[f"{name}.weightbank_scale"] = scale
        else:
            out[name] = value
    return out, errors


def _safetensors_tensors(
    state: Any, cid: str, *, selected: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The name -> tensor dict safetensors can write, and alias name -> the name it shared storage with."""
    flat = isinstance(state, dict) and all(
        isinstance(k, str) and isinstance(v, (torch.Tensor, np.ndarray)) for k, v in state.items()
    )
    if not flat and not selected:
        raise IncompatibleState(
            f"checkpoint {cid[:12]} is not a flat dict of named tensors, which is all .safetensors "
            "can hold; pick tensors with select= (e.g. select='model.*'; they keep their dotted "
            "names) or export to .pt to keep the whole structure"
        )
    _, leaves = flatten(state)
    named = {leaf.name: leaf.tensor for leaf in leaves}
    samples = {t.dtype: t for t in named.values()}
    bad = {d for d, t in samples.items() if not _safetensors_can_hold(t)}
    if bad:
        raise IncompatibleState(
            f"checkpoint {cid[:12]} holds dtype(s) {', '.join(sorted(str(d) for d in bad))} that this "
            "safetensors cannot write; export to .pt instead",
            [n for n, t in named.items() if t.dtype in bad],
        )
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    owner: dict[tuple[torch.device, int], str] = {}
    for name, t in named.items():
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if storage.nbytes() and key in owner:
            # safetensors refuses tensors that share memory: write a copy, say whose.
            aliases[name] = owner[key]
            tensors[name] = t.clone(memory_format=torch.contiguous_format)
        else:
            if storage.nbytes():
                owner[key] = name
            tensors[name] = t.contiguous()
    return tensors, aliases


def _safetensors_can_hold(sample: torch.Tensor) -> bool:
    """Whether safetensors can write ``sample``'s dtype (probed with an empty view: no copy)."""
    try:
        safetensors_bytes({"probe": sample.as_strided((0,), (1,))})
    except (KeyError, ValueError, TypeError, SafetensorError):
        return False
    return True


def _safetensors_metadata(info: CheckpointInfo, aliases: Mapping[str, str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    imported = info.meta.get("safetensors_metadata")
    if isinstance(imported, dict):
        metadata.update({k: v for k, v in imported.items() if isinstance(k, str) and isinstance(v, str)})
    metadata.pop(_ALIASES_KEY, None)
    metadata.setdefault("format", "pt")  # transformers refuses safetensors files without it
    metadata["weightbank_id"] = info.id
    metadata["weightbank_run"] = info.run
    if info.step is not None:
        metadata["weightbank_step"] = str(info.step)
    else:
        metadata.pop("weightbank_step", None)
    if aliases:
        metadata[_ALIASES_KEY] = json.dumps(aliases, sort_keys=True)
    return metadata


def _numpy_to_torch(obj: Any) -> Any:
    """The state with numpy leaves as tensors, so ``torch.load(weights_only=True)`` reads it back."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {k: _numpy_to_torch(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_numpy_to_torch(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_numpy_to_torch(v) for v in obj)
    return obj


# -- atomic files ---------------------------------------------------------------------------


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.parent.is_dir():
        raise ExternalFileError(out, f"cannot export to {out}: the directory {out.parent} does not exist")
    if out.is_dir():
        raise ExternalFileError(out, f"cannot export to {out}: it is a directory")
    if out.exists() and not overwrite:
        raise TargetExists(out, f"cannot export to {out}: the file exists; pass overwrite=True to replace it")


def _atomic_write(out: Path, write: Callable[[Path], None], *, overwrite: bool) -> None:
    """Run ``write`` on a temporary file beside ``out``, make it durable, then move it into place."""
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never clobber a stranger's file; mode 0o666 lets the umask decide, like open().
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, out)
        else:
            _link_no_clobber(tmp, out)
        fsync_dir(out.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _link_no_clobber(tmp: Path, out: Path) -> None:
    """Publish ``tmp`` as ``out`` unless ``out`` appeared meanwhile (hard link is atomic and exclusive)."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise TargetExists(
            out, f"cannot export to {out}: the file exists; pass overwrite=True to replace it"
        ) from None
    except OSError:
        # No hard links on this filesystem: fall back to check-then-rename.
        if out.exists():
            raise TargetExists(
                out, f"cannot export to {out}: the file exists; pass overwrite=True to replace it"
            ) from None
        os.replace(tmp, out)
