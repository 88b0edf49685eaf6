"""The adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

Each tensor of the sharing plan is stored once under its plan key (a shared A is one entry,
``...layer.*.attention.self.query.lora_A``), and trained modules under ``modules_to_save.<path>``.
Weights load with safetensors only.

This module is also the one home of how the project writes and reads files safely:

* every file is written to a temporary name in the same directory, flushed to disk and renamed
  into place, so a crash never leaves a half-written file where a good one was; a full disk is a
  :class:`WriteError` that names the file and leaves the previous one untouched;
* every safetensors file the project writes records the sha256 of its tensor data (the bytes
  after the 8-byte header length and the JSON header) in its metadata under
  ``sharelora_data_sha256``, and every load checks it: a flipped byte is an error that names the
  file, not a model that silently computes something else. Files without the key (written by
  PEFT, transformers or an older sharelora) load unchecked;
* an adapter's weights also carry its config, so that a crash between writing the two files of
  the directory cannot pair new weights with an old config (see :func:`save_adapter`).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes

from .config import CONFIG_NAME, ShareLoraConfig
from .errors import ShareLoraError

WEIGHTS_NAME = "adapter_model.safetensors"
MODULES_TO_SAVE_PREFIX = "modules_to_save."
DATA_SHA256_KEY = "sharelora_data_sha256"  # metadata: sha256 (hex) of the file's tensor data
CONFIG_KEY = "sharelora_config"  # adapter metadata: the adapter_config.json text saved with these weights
REPLACES_CONFIG_KEY = "sharelora_replaces_config_sha256"  # adapter metadata: sha256 of the config it replaced

_PLACEHOLDER = "0" * 64  # a hex sha256's length: the header keeps its size when the digest is filled in
_CHUNK = 1 << 20
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class WriteError(ShareLoraError, OSError):
    """A file could not be written (a full disk, no permission); the previous file at that path is unchanged.

    It is an ``OSError`` too (with the original ``errno``), so callers that treat an unwritable
    cache as "skip it" keep doing so.
    """


# --- writing -----------------------------------------------------------------------------------
def _write_error(path: Path, e: OSError) -> WriteError:
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        reason = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        fix = "free space on that disk or write to another directory"
    else:
        reason, fix = e.strerror or str(e), "check that the directory is writable"
    err = WriteError(f"could not write {path}: {reason} ({type(e).__name__}: {e}); {fix}. "
                     f"The previous {path.name}, if there was one, is unchanged")
    err.errno = e.errno
    return err


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _write_temp(path: Path, head, body: Iterable = (), digest_at: int | None = None) -> Path:
    """Write ``head`` then the ``body`` chunks to a new temporary file next to ``path``, on disk; return its path.

    With ``digest_at``, the hex sha256 of the body replaces the 64 bytes of ``head`` at that
    offset once the body is written, so the data is hashed in the same pass that writes it.
    The temporary file (``.<name>.<random>.tmp``) is removed if anything fails; only a killed
    process leaves one behind, and the next write of the same file removes those left over an
    hour unmodified (:func:`_remove_stale_temps`). Nothing reads those names.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            _write_all(fd, head)
            h = hashlib.sha256()
            for chunk in body:
                h.update(chunk)
                _write_all(fd, chunk)
            if digest_at is not None:
                os.lseek(fd, digest_at, os.SEEK_SET)
                _write_all(fd, h.hexdigest().encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise
    return Path(tmp)


STALE_TEMP_S = 3600.0  # a temporary file this long unmodified belongs to a killed writer, not a live one


def _remove_stale_temps(path: Path) -> None:
    """Remove ``path``'s temporary files (``.<name>.<random>.tmp``) that a killed process left behind.

    A live writer modifies its file as it goes; one untouched for :data:`STALE_TEMP_S` is an orphan.
    Best effort: a file that vanished or cannot be removed is left to the next write.
    """
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()
        except OSError:
            pass


def _commit(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` over ``path`` (atomic) and make the rename durable."""
    try:
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # Orders the renames on disk (weights before config); best effort: not every system allows it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    _commit(_write_temp(path, data), path)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --- the safetensors layout: u64 header length, JSON header, data --------------------------------
def _parse_header(prefix) -> tuple[dict, int]:
    """The JSON header of a safetensors file from its first bytes, and where its data section starts."""
    if len(prefix) < 8:
        raise ValueError(f"{len(prefix)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", bytes(prefix[:8]))
    if n > _MAX_HEADER or len(prefix) < 8 + n:
        raise ValueError(f"header of {n} bytes does not fit in the file")
    header = json.loads(bytes(prefix[8:8 + n]))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header, 8 + n


def _read_header(f) -> dict:
    """The JSON header of the open safetensors file ``f``, leaving ``f`` at the start of the data."""
    prefix = f.read(8)
    size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
    return _parse_header(prefix + f.read(min(size, _MAX_HEADER + 1)))[0]  # a short file reads short


# bytes per element of each safetensors dtype
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def _check_layout(header: dict, data_bytes: int) -> None:
    """Refuse a header whose tensors do not tile the data section exactly: each entry a known dtype,
    a shape of non-negative ints and ``data_offsets`` [begin, end) of ``prod(shape) * itemsize`` bytes,
    the entries back to back from 0 to ``data_bytes`` (the layout safetensors itself requires)."""
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("__metadata__ is not a map of strings to strings")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise ValueError(f"tensor {name[:80]!r}: an entry needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"tensor {name[:80]!r}: unknown dtype {str(dtype)[:20]!r}")
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise ValueError(f"tensor {name[:80]!r}: the shape is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {name[:80]!r}: data_offsets is not [begin, end] with 0 <= begin <= end")
        numel = 1
        for n in shape:
            numel *= n
        if offsets[1] - offsets[0] != numel * _DTYPE_BYTES[dtype]:
            raise ValueError(f"tensor {name[:80]!r}: {dtype} {shape} takes {numel * _DTYPE_BYTES[dtype]} bytes, "
                             f"but data_offsets span {offsets[1] - offsets[0]}")
        spans.append(tuple(offsets))
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise ValueError(f"the tensors' data overlap or leave a gap at byte {end} of the data section")
        end = stop
    if end != data_bytes:
        raise ValueError(f"the header describes {end} bytes of tensor data, but the file holds {data_bytes}")


def safetensors_header(path: str | Path) -> tuple[dict, int, int]:
    """(header, where the data starts, file size) of a safetensors file, read and checked without its data.

    The header is checked against the file's size: the data section is exactly the tensors the header
    lists (see ``_check_layout``), so a truncated, padded or forged file is refused before a byte of
    its data is read. A ShareLoraError names the file and what is wrong.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            claimed = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            if 8 + claimed > size:
                raise ValueError(f"the header claims {claimed} bytes, but the file has {size}")
            header, start = _parse_header(prefix + f.read(claimed))
        _check_layout(header, size - start)
    except FileNotFoundError:
        raise ShareLoraError(f"{path} does not exist") from None
    except (OSError, ValueError, RecursionError) as e:
        raise _unreadable(path, e) from e
    return header, start, size


def _sealed_header(header: dict) -> tuple[bytes, int]:
    """The file's first bytes for ``header`` with a digest placeholder in its metadata, and the placeholder's offset."""
    meta = {**(header.get("__metadata__") or {}), DATA_SHA256_KEY: _PLACEHOLDER}
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    text = json.dumps({"__metadata__": meta, **tensors}, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    head = struct.pack("<Q", len(text)) + text
    # The key followed by `":"` cannot occur inside a JSON string (its quotes would be escaped).
    marker = f'"{DATA_SHA256_KEY}":"'.encode("ascii")
    return head, head.index(marker + _PLACEHOLDER.encode("ascii")) + len(marker)


def _unreadable(path: Path, e: Exception) -> ShareLoraError:
    return ShareLoraError(
        f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or "
        f"corrupted: save the adapter again or restore the file"
    )


def _check_digest(path: Path, want: str, got: str) -> None:
    """Refuse a file whose data hash to ``got`` when it recorded ``want``."""
    if got != want:
        raise ShareLoraError(
            f"{path} is corrupted: the sha256 of its tensor data is {got[:16]}..., not the {want[:16]}... "
            f"recorded when it was written (bytes changed on disk or in a copy). It was not loaded; restore "
            f"it from a good copy, or delete it and write it again"
        )


def _commit_weights_then_config(tmp_weights: Path, weights: Path, config_path: Path, text: str) -> None:
    """Write the config's temporary file, then rename the weights and then the config into place.

    Either temporary file is removed if a step fails before its rename. The weights' metadata holds
    the config (or the manifest), so weights renamed without their config still load, with a warning.
    """
    try:
        tmp_config = _write_temp(config_path, text.encode("utf-8"))
    except BaseException:
        _remove(tmp_weights)
        raise
    try:
        _commit(tmp_weights, weights)
    except BaseException:
        _remove(tmp_config)
        raise
    _commit(tmp_config, config_path)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` as one safetensors file that records the sha256 of its data."""
    path = Path(path)
    _commit(_write_sealed(path, tensors, metadata), path)


def _write_sealed(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path:
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    raw = safetensors_bytes(flat, metadata={"format": "pt", **(metadata or {})})
    header, start = _parse_header(raw)
    head, digest_at = _sealed_header(header)
    return _write_temp(path, head, [memoryview(raw)[start:]], digest_at)


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, its data checked against the sha256 it records.

    The header is checked first (``safetensors_header``), then the file is read once; a missing,
    truncated or corrupted file is a ShareLoraError.
    """
    path = Path(path)
    if not path.is_file():
        raise ShareLoraError(f"{path} does not exist")
    safetensors_header(path)  # a bad header is refused before the data is read
    buf = path.read_bytes()
    try:
        header, start = _parse_header(buf)
        tensors = safetensors_load(buf)
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise _unreadable(path, e) from e
    metadata = dict(header.get("__metadata__") or {})
    if DATA_SHA256_KEY in metadata:  # files of other tools and older sharelora record none: unchecked
        _check_digest(path, metadata[DATA_SHA256_KEY], hashlib.sha256(memoryview(buf)[start:]).hexdigest())
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, metadata


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupted file is a ShareLoraError."""
    return read_safetensors(path, device)[0]


def verify_safetensors(path: str | Path) -> bool:
    """Check a safetensors file's data against its recorded sha256 without loading it (one streaming read).

    Returns False when the file records no sha256 (nothing to check); raises ShareLoraError when
    it is unreadable or its data does not match.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            want = (_read_header(f).get("__metadata__") or {}).get(DATA_SHA256_KEY)
            if want is None:
                return False
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
    except FileNotFoundError:
        raise ShareLoraError(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from e
    _check_digest(path, want, h.hexdigest())
    return True


def seal_safetensors(path: str | Path) -> None:
    """Add the sha256 of its data to a safetensors file another tool wrote (transformers' ``save_pretrained``).

    The file is rewritten through a temporary file and a rename, reading and hashing its data
    in one pass; the tensors are untouched.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head, digest_at = _sealed_header(_read_header(f))
        tmp = _write_temp(path, head, iter(lambda: f.read(_CHUNK), b""), digest_at)
    shutil.copymode(path, tmp)  # mkstemp makes 0600 files; keep what the writer chose
    _commit(tmp, path)


# --- the adapter directory ---------------------------------------------------------------------
def save_adapter(directory: str | Path, config: ShareLoraConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` so that a crash leaves one whole adapter.

    Two files cannot be replaced in one step, and a crash between the two renames would leave
    new weights next to the previous config: with another alpha or other targets that pair
    loads and computes something neither save wrote. So the weights file carries the whole
    adapter: its metadata hold the config text (``sharelora_config``) and the sha256 of the
    ``adapter_config.json`` it replaces (``sharelora_replaces_config_sha256``). The order is

    1. write both files under temporary names, flushed (a full disk fails here, nothing replaced);
    2. rename the weights into place: the commit point;
    3. rename the config into place.

    A crash before 2 leaves the previous adapter (and stale ``.tmp`` files, which nothing reads);
    after 3 the new one. Between 2 and 3 the config on disk is exactly the one the save
    replaced, which :func:`load_adapter` recognises by its sha256 and overrides with the config
    in the weights: the new adapter, complete. Recognising it, rather than always preferring the
    stored config, keeps a config that was edited or copied from another adapter an error
    instead of an edit silently ignored; refusing every mismatch instead would turn each
    interrupted save into an error although the new adapter is intact.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ShareLoraError(f"{directory} exists and is not a directory; choose another output path")
    directory.mkdir(parents=True, exist_ok=True)
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    text = config.to_json_string()
    metadata = {"sharelora_format_version": "1", CONFIG_KEY: text}
    try:
        metadata[REPLACES_CONFIG_KEY] = hashlib.sha256(config_path.read_bytes()).hexdigest()
    except OSError:
        pass  # no previous config (or an unreadable one, which an interrupted save then leaves an error)
    _commit_weights_then_config(_write_sealed(weights, tensors, metadata), weights, config_path, text)
    return directory


def load_adapter(directory: str | Path, device: str | torch.device = "cpu") -> tuple[ShareLoraConfig, dict[str, torch.Tensor]]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ShareLoraError(f"adapter directory {directory} does not exist")
    if not (directory / WEIGHTS_NAME).is_file():
        other = sorted(p.name for p in directory.iterdir())
        hint = " (.bin pickles are not loaded for safety; convert to safetensors)" if any(
            n.endswith(".bin") for n in other) else ""
        raise ShareLoraError(f"{directory} has no {WEIGHTS_NAME}; it holds {other}{hint}")
    tensors, metadata = read_safetensors(directory / WEIGHTS_NAME, device)
    return _adapter_config(directory, metadata), tensors


def _adapter_config(directory: Path, metadata: dict[str, str]) -> ShareLoraConfig:
    """The config that belongs to the weights whose ``metadata`` are given (see :func:`save_adapter`)."""
    path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    stored = metadata.get(CONFIG_KEY)
    if stored is None:  # weights of an older sharelora: the config file is all there is
        return ShareLoraConfig.from_json_file(path)
    try:
        on_disk = path.read_bytes()
    except FileNotFoundError:
        on_disk = None
    if on_disk == stored.encode("utf-8"):
        return ShareLoraConfig.from_json_file(path)  # the usual case: both files of one save
    if on_disk is None or hashlib.sha256(on_disk).hexdigest() == metadata.get(REPLACES_CONFIG_KEY):
        why = "is missing" if on_disk is None else "is the previous save's (the last save was interrupted)"
        warnings.warn(f"{path} {why}; using the config saved in {weights} with its weights", stacklevel=3)
        return ShareLoraConfig.from_dict(json.loads(stored))
    config = ShareLoraConfig.from_json_file(path)  # an unreadable file or unknown fields say so first
    ours, saved = config.to_dict(), ShareLoraConfig.from_dict(json.loads(stored)).to_dict()
    if ours != saved:
        differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
        raise ShareLoraError(
            f"{path} does not belong to {weights}: it differs from the config saved with those weights "
            f"(in {differ}) and is not the config their save replaced, so it was edited or copied from "
            f"another adapter, and the pair would compute something neither save wrote. Save the adapter "
            f"again, or delete {path} to load the config saved in the weights"
        )
    return config  # the same config, written differently (re-indented by hand or by a tool)


def read_json(path: str | Path) -> dict:
    """The JSON object in ``path``; anything else (a list, a number, bad JSON) is a ShareLoraError."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ShareLoraError(f"{path} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ShareLoraError(f"{path} is not valid JSON ({e}); the file is corrupted or truncated") from e
    if not isinstance(d, dict):
        raise ShareLoraError(f"{path} holds a JSON {type(d).__name__}, not a JSON object ({{...}}) as an adapter "
                             "config does; the file is not an adapter config")
    return d


# --- several adapters in one directory ------------------------------------------------------------
# adapter_config.json holds {"adapter_type": "SHARELORA_MULTI", "adapters": {name: config}, ...} and
# adapter_model.safetensors every tensor once: "<adapter>/<local key>" for an adapter's own tensors and
# its modules_to_save ("<adapter>/modules_to_save.<path>.<param>"), "@<task group>/<local key>" for a
# tensor the adapters of a task group share. The weights file also carries the manifest in its
# metadata and is written first, so it is the complete record of a save.
MULTI_ADAPTER_TYPE = "SHARELORA_MULTI"
MULTI_FORMAT_VERSION = 2
MANIFEST_KEY = "sharelora_manifest"


def is_multi_adapter(directory: str | Path) -> bool:
    """Whether ``directory`` holds the multi-adapter format (else: a single adapter, or nothing).

    The weights decide (they are renamed into place first, so after an interrupted save they are
    the newer file): a manifest in their metadata means several adapters, a config one. Only
    weights of an older sharelora (neither) leave the decision to ``adapter_config.json``.
    """
    directory = Path(directory)
    try:
        with open(directory / WEIGHTS_NAME, "rb") as f:
            meta = _read_header(f).get("__metadata__") or {}
    except (OSError, ValueError, struct.error):
        meta = {}
    if MANIFEST_KEY in meta:
        return True
    if CONFIG_KEY in meta:
        return False
    path = directory / CONFIG_NAME
    if not path.is_file():
        return False
    d = read_json(path)
    return isinstance(d, dict) and d.get("adapter_type") == MULTI_ADAPTER_TYPE


def save_adapters(directory: str | Path, configs: dict[str, ShareLoraConfig], tensors: dict[str, torch.Tensor],
                  active: list[str]) -> Path:
    """Write several adapters (``tensors`` keyed by file key, see above) into one directory.

    As :func:`save_adapter`: both files are written under temporary names first, then the
    weights (which carry the manifest, the complete record of the save) are renamed into place,
    then the config. A crash in between leaves weights whose manifest :func:`load_adapters` reads.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ShareLoraError(f"{directory} exists and is not a directory; choose another output path")
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"adapter_type": MULTI_ADAPTER_TYPE, "format_version": MULTI_FORMAT_VERSION,
                "adapters": {n: c.to_dict() for n, c in configs.items()}, "adapter_order": list(configs),
                "active_adapters": list(active)}
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    weights, config_path = directory / WEIGHTS_NAME, directory / CONFIG_NAME
    tmp_weights = _write_sealed(weights, tensors, {"sharelora_format_version": str(MULTI_FORMAT_VERSION),
                                                    MANIFEST_KEY: text})
    _commit_weights_then_config(tmp_weights, weights, config_path, text)
    return directory


def _manifest_configs(manifest: dict, where: Path) -> dict[str, ShareLoraConfig]:
    if manifest.get("format_version", MULTI_FORMAT_VERSION) > MULTI_FORMAT_VERSION:
        raise ShareLoraError(f"{where} was written by a newer sharelora (format {manifest['format_version']}); "
                             "upgrade sharelora")
    adapters = manifest.get("adapters")
    if not isinstance(adapters, dict) or not adapters:
        raise ShareLoraError(f"{where}: the multi-adapter manifest lists no adapters; the file is corrupted")
    order = [n for n in manifest.get("adapter_order", []) if n in adapters]
    order += [n for n in adapters if n not in order]
    out = {}
    for name in order:
        d = adapters[name]
        try:
            out[name] = ShareLoraConfig.from_dict(d)
        except ShareLoraError as e:
            raise ShareLoraError(f"{where}: adapter {name!r}: {e}") from e
    return out


def saved_configs(directory: str | Path) -> dict[str, ShareLoraConfig]:
    """Every adapter's config in a multi-adapter directory, in saved order, from the weights' header alone."""
    weights = Path(directory) / WEIGHTS_NAME
    try:
        with open(weights, "rb") as f:
            meta = _read_header(f).get("__metadata__") or {}
    except (OSError, ValueError, struct.error) as e:
        raise _unreadable(weights, e) from e
    if MANIFEST_KEY not in meta:
        raise ShareLoraError(f"{weights} has no adapter manifest; it is not a multi-adapter file")
    return _manifest_configs(json.loads(meta[MANIFEST_KEY]), weights)


def load_adapters(directory: str | Path, names: list[str] | None = None,
                  device: str | torch.device = "cpu") -> tuple[dict[str, ShareLoraConfig], dict[str, torch.Tensor], list[str]]:
    """(configs, tensors by file key, active adapters) of ``names`` (None: all) of a multi-adapter directory.

    Only the tensors the chosen adapters read are kept: their own and their task groups'.
    """
    directory = Path(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ShareLoraError(f"{directory} has no {WEIGHTS_NAME}; it holds {sorted(p.name for p in directory.iterdir())}")
    # One read checks the whole file's sha256; only the chosen adapters' tensors are kept.
    everything, meta = read_safetensors(weights, device)
    keys = list(everything)
    if MANIFEST_KEY not in meta:
        raise ShareLoraError(f"{weights} has no adapter manifest: {directory / CONFIG_NAME} says several adapters "
                             "but the weights are not a multi-adapter file (an interrupted save?); save again")
    # The weights are written first and carry the manifest: they are the complete record of a save.
    manifest = json.loads(meta[MANIFEST_KEY])
    configs = _manifest_configs(manifest, weights)
    chosen = list(configs) if names is None else list(names)
    unknown = [n for n in chosen if n not in configs]
    if unknown:
        raise ShareLoraError(f"{directory} has no adapter {unknown}; it holds {sorted(configs)}")
    prefixes = tuple(f"{n}/" for n in chosen) + tuple(
        f"@{configs[n].task_group}/" for n in chosen if configs[n].task_share != "none")
    wanted = [k for k in keys if k.startswith(prefixes)]
    for n in chosen:
        if not any(k.startswith(f"{n}/") for k in keys) and configs[n].task_share == "none":
            raise ShareLoraError(f"{weights} holds no tensors of adapter {n!r}; the file is incomplete")
    tensors = {k: everything[k] for k in wanted}
    active = [n for n in manifest.get("active_adapters", []) if n in chosen]
    return {n: configs[n] for n in chosen}, tensors, active
