"""The sha256 of a base model folder, per file and per tensor, and the check against a record.

Under ``lora-stacked`` every facility merges each round's update into its own copy of the base
model, and the aggregation computes the same merge as the canonical base. A record
(``base_hashes.json``) holds the canonical base's hashes:

    {"format": "xffl-base-hashes/1",
     "files": {"model-00001-of-00002.safetensors": "<sha256>", "config.json": "<sha256>", ...},
     "tensors": {"model.embed_tokens.weight": {"file": "model-00001-of-00002.safetensors",
                  "dtype": "BF16", "shape": [32000, 4096], "sha256": "<sha256 of its bytes>"}}}

:func:`check_base_hashes` compares a folder with a record: the files' sha256 first (one read of
each file); on a mismatch the per-tensor hashes name the first tensor that differs, so that a
facility refuses a diverged base saying where it diverged. ``tensors`` may be absent (then the
shard is named, not the tensor).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

HASHES_FORMAT = "xffl-base-hashes/1"
HASHES_FILE = "base_hashes.json"
MAX_HASHES_BYTES = 32 << 20
SHA256 = re.compile(r"^[0-9a-f]{64}$")
FILE_NAME = re.compile(r"^[^/\\\0]{1,255}$")
READ_BLOCK = 16 << 20


class BaseHashError(ValueError):
    """A base model folder or a hash record is unusable; the message names the file."""


class BaseMismatch(BaseHashError):
    """A base model folder differs from its record: ``file`` and, when known, ``tensor`` say
    where (the first tensor, in file order, whose bytes, dtype or shape differ)."""

    def __init__(self, message: str, *, file: str, tensor: str | None = None):
        super().__init__(message)
        self.file, self.tensor = file, tensor


@dataclass(frozen=True)
class TensorHash:
    file: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str


@dataclass(frozen=True)
class BaseHashes:
    """``files``: top-level file name -> sha256; ``tensors``: name -> :class:`TensorHash`
    (empty when not recorded)."""

    files: dict[str, str]
    tensors: dict[str, TensorHash] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": HASHES_FORMAT,
            "files": dict(sorted(self.files.items())),
            "tensors": {
                name: {"file": t.file, "dtype": t.dtype, "shape": list(t.shape), "sha256": t.sha256}
                for name, t in sorted(self.tensors.items())
            },
        }

    @classmethod
    def from_json(cls, data: object, *, where: str) -> BaseHashes:
        """A record from its JSON form (or a plain ``{file: sha256}`` map), every field checked."""
        if isinstance(data, Mapping) and "files" not in data and "format" not in data:
            data = {"format": HASHES_FORMAT, "files": data}  # a plain {file: sha256} map
        if not isinstance(data, Mapping) or data.get("format") != HASHES_FORMAT:
            raise BaseHashError(f"{where}: not a {HASHES_FORMAT} record")
        files = data.get("files")
        if not isinstance(files, Mapping) or not files:
            raise BaseHashError(f"{where}: files must map file names to sha256")
        for name, digest in files.items():
            if not isinstance(name, str) or not FILE_NAME.fullmatch(name) or name in (".", ".."):
                raise BaseHashError(f"{where}: files: {str(name)[:80]!r} is not a file name")
            if not isinstance(digest, str) or not SHA256.fullmatch(digest):
                raise BaseHashError(f"{where}: files: {name}: not a sha256 (64 hex digits)")
        tensors = {}
        raw = data.get("tensors") or {}
        if not isinstance(raw, Mapping):
            raise BaseHashError(f"{where}: tensors must map tensor names to their hashes")
        for name, entry in raw.items():
            try:
                shape = tuple(entry["shape"])
                ok = (
                    isinstance(name, str)
                    and entry["file"] in files
                    and isinstance(entry["dtype"], str)
                    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                    and SHA256.fullmatch(entry["sha256"]) is not None
                )
            except (KeyError, TypeError):
                ok = False
            if not ok:
                raise BaseHashError(
                    f"{where}: tensors: {str(name)[:120]!r} needs file (one of files), dtype, shape, sha256"
                )
            tensors[name] = TensorHash(entry["file"], entry["dtype"], shape, entry["sha256"])
        return cls(dict(files), tensors)


def load_base_hashes(path: str | Path) -> BaseHashes:
    """A record from a JSON file (at most ``MAX_HASHES_BYTES``)."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            raw = file.read(MAX_HASHES_BYTES + 1)
    except OSError as error:
        raise BaseHashError(f"{path}: cannot read it: {error.strerror or error}") from None
    if len(raw) > MAX_HASHES_BYTES:
        raise BaseHashError(f"{path}: larger than {MAX_HASHES_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BaseHashError(f"{path}: not valid JSON ({error})") from None
    return BaseHashes.from_json(data, where=str(path))


def write_base_hashes(path: Path, hashes: BaseHashes) -> Path:
    """Writes the record beside ``path``, fsyncs it, renames it into place."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(json.dumps(hashes.to_json(), indent=1) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        while block := file.read(READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def tensor_hashes(path: Path, file: str) -> dict[str, TensorHash]:
    """Every tensor of one safetensors file, hashed (its header is validated first)."""
    from xffl_tasks.aggregate.safetensors_format import HeaderError, read_header

    try:
        header = read_header(path)
    except HeaderError as error:
        raise BaseHashError(f"{path}: {error}") from None
    found = {}
    with open(path, "rb", buffering=0) as source:
        for entry in header.tensors:
            digest = hashlib.sha256()
            offset, left = header.data_start + entry.begin, entry.nbytes
            while left:
                block = os.pread(source.fileno(), min(left, READ_BLOCK), offset)
                if not block:
                    raise BaseHashError(f"{path}: ends inside tensor {entry.name!r}")
                digest.update(block)
                offset, left = offset + len(block), left - len(block)
            found[entry.name] = TensorHash(
                file, entry.dtype.name, tuple(entry.shape), digest.hexdigest()
            )
    return found


def hash_model_folder(folder: str | Path, *, tensors: bool = True) -> BaseHashes:
    """The record of a folder as it is: every top-level file, and every tensor (``tensors``)."""
    folder = Path(folder)
    files = {p.name: sha256_of(p) for p in sorted(folder.iterdir()) if p.is_file()}
    found: dict[str, TensorHash] = {}
    if tensors:
        for name in sorted(files):
            if name.endswith(".safetensors"):
                found.update(tensor_hashes(folder / name, name))
    return BaseHashes(files, found)


def first_difference(
    got: Mapping[str, TensorHash], expected: Mapping[str, TensorHash], file: str
) -> tuple[str, str] | None:
    """``(tensor, how)`` for the first tensor of ``file`` (in the expected order) that differs,
    or is missing or extra; None when the tensors of ``file`` all match."""
    mine = {n: t for n, t in got.items() if t.file == file}
    theirs = {n: t for n, t in expected.items() if t.file == file}
    for name, want in theirs.items():
        have = mine.get(name)
        if have is None:
            return name, "is missing"
        if (have.dtype, have.shape) != (want.dtype, want.shape):
            return name, (
                f"is {have.dtype} {list(have.shape)}, the expected base's {want.dtype} {list(want.shape)}"
            )
        if have.sha256 != want.sha256:
            return name, f"holds other bytes (sha256 {have.sha256[:12]}..., expected {want.sha256[:12]}...)"
    extra = sorted(set(mine) - set(theirs))
    return (extra[0], "is not in the expected base") if extra else None


def compare_hashes(
    got: BaseHashes, expected: BaseHashes, *, folder: Path, label: str
) -> None:
    """Raises :class:`BaseMismatch` at the first file of ``expected`` whose hash ``got`` does
    not have, naming the first differing tensor (from ``got.tensors``, or hashed from
    ``folder``'s file when ``got`` has none for it). A safetensors file that ``got`` has and
    ``expected`` lacks is a mismatch too; other extra files are not."""
    extra = sorted(n for n in got.files if n.endswith(".safetensors") and n not in expected.files)
    if extra:
        raise BaseMismatch(
            f"{label}: weight file {extra[0]!r} is not in the expected base", file=extra[0]
        )
    for name, want in sorted(expected.files.items()):
        have = got.files.get(name)
        if have == want:
            continue
        if have is None:
            raise BaseMismatch(f"{label}: lacks {name!r} of the expected base", file=name)
        where = f"{label}: {name} differs from the expected base (sha256 {have[:12]}..., expected {want[:12]}...)"
        if not name.endswith(".safetensors"):
            raise BaseMismatch(where, file=name)
        if not expected.tensors:
            raise BaseMismatch(where + "; no per-tensor hashes to name the tensor", file=name)
        mine = {n: t for n, t in got.tensors.items() if t.file == name}
        if not mine:
            mine = tensor_hashes(folder / name, name)
        found = first_difference(mine, expected.tensors, name)
        if found is None:
            raise BaseMismatch(where + "; its tensors match: the header differs", file=name)
        raise BaseMismatch(
            f"{label}: tensor {found[0]!r} ({name}) {found[1]}", file=name, tensor=found[0]
        )


def check_base_hashes(
    base_dir: str | Path, expected: BaseHashes | Mapping[str, str] | str | Path
) -> BaseHashes:
    """Checks the folder against ``expected`` (a record, a ``{file: sha256}`` map or the path of
    a record): every expected file present with its sha256, no unexpected weight file. Raises
    :class:`BaseMismatch` naming the first differing tensor (see :func:`compare_hashes`);
    returns the files' hashes."""
    base_dir = Path(base_dir)
    if isinstance(expected, (str, Path)):
        expected = load_base_hashes(expected)
    elif not isinstance(expected, BaseHashes):
        expected = BaseHashes.from_json(dict(expected), where="expected hashes")
    if not base_dir.is_dir():
        raise BaseHashError(f"{base_dir}: not a folder")
    present = {p.name for p in base_dir.iterdir() if p.is_file()}
    wanted = set(expected.files) | {n for n in present if n.endswith(".safetensors")}
    got = BaseHashes({n: sha256_of(base_dir / n) for n in sorted(wanted & present)})
    compare_hashes(got, expected, folder=base_dir, label=f"base {base_dir}")
    return got
