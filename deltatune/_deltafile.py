"""The bytes of a delta file: a safetensors file written deterministically, with a digest, read defensively.

safetensors' own writer orders the metadata by a randomly seeded hash map, so the same model gave different
bytes on every save; this writer sorts metadata keys and tensor names (the layout safetensors reads). The
``digest`` entry is a sha256 over the other metadata entries and every tensor's name, dtype, shape and bytes:
it catches flipped bits and edited values, not a forger (anyone can recompute it).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from deltatune.errors import DeltaTuneError

FORMAT = "deltatune-delta"
VERSION = "2"
READABLE = ("1", "2")
"""Version 1 (deltatune 0.1.0) has no digest and stores the user's target patterns; it still loads."""
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without copying a contiguous CPU tensor."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the metadata (except ``digest``, keys sorted) and every tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "digest"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Writes a digested safetensors file atomically (replacing a symlink, not its target) with the umask's mode."""
    metadata = {**metadata, "digest": digest(metadata, tensors)}
    header: dict[str, object] = {"__metadata__": metadata}
    offset, blobs = 0, []
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _CODES:
            raise DeltaTuneError(f"save_delta: {name} has dtype {t.dtype}, which a delta file does not store")
        blob = tensor_bytes(t)
        header[name] = {"dtype": _CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for blob in blobs:
                f.write(blob)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; other outputs follow the umask
        os.replace(tmp, path)  # renames over a symlink itself, never writes through it
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path.stat().st_size


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a deltatune file whose digest holds; anything else raises DeltaTuneError."""
    _require_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers and data
        raise DeltaTuneError(f"{str(path)!r} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    if meta.get("format") != FORMAT:
        raise DeltaTuneError(f"{str(path)!r} is not a deltatune delta file (no '{FORMAT}' metadata)")
    version = meta.get("format_version")
    if version not in READABLE:
        raise DeltaTuneError(
            f"{str(path)!r} has delta format version {version!r}; this deltatune reads versions "
            f"{', '.join(READABLE)}: upgrade deltatune"
        )
    if version != "1" and meta.get("digest") != digest(meta, tensors):
        raise DeltaTuneError(
            f"{str(path)!r} fails its integrity check (sha256 digest of its metadata and tensors): the file was "
            f"corrupted or edited after it was saved; save it again from the trained model"
        )
    check_values(tensors, path)
    return meta, tensors


def _require_regular_file(path: Path) -> None:
    if path.is_dir():
        raise DeltaTuneError(f"{str(path)!r} is a directory; pass the delta file (.safetensors) inside it")
    if not path.exists():
        raise DeltaTuneError(f"delta file {str(path)!r} does not exist")
    if not path.is_file():
        raise DeltaTuneError(f"{str(path)!r} is not a regular file (a device, pipe or socket); pass a delta file")


def check_values(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Refuses non-floating dtypes deltas never have (only the file's float tensors carry deltas) and NaN/inf."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and t.dtype not in FLOATS:
            raise DeltaTuneError(f"{str(path)!r}: {name} is stored as {t.dtype}; deltas are float16/bfloat16/32/64")
        if t.dtype in FLOATS and not bool(torch.isfinite(t).all()):
            raise DeltaTuneError(
                f"{str(path)!r}: {name} holds NaN or infinite values (the run that saved it diverged, or a file "
                f"without a digest was corrupted); such deltas cannot be used"
            )


def decode(meta: dict[str, str], key: str, path: Path) -> object:
    """A JSON-encoded metadata entry; a missing or unparsable one (bad JSON, too deep) raises DeltaTuneError."""
    if key not in meta:
        raise DeltaTuneError(f"{str(path)!r}: corrupt deltatune metadata (no {key!r} entry)")
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError) as e:
        raise DeltaTuneError(f"{str(path)!r}: corrupt deltatune metadata ({key}: {type(e).__name__} {e})") from e
