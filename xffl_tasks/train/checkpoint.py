"""Model folders in and out: checked before anything loads, written aside and renamed.

The input is a Hugging Face model folder with safetensors weights (one file, or shards and
their index); pickle checkpoints (``pytorch_model.bin``, ``*.pt``...) are refused. The output
has the same tensor names and dtypes as the input (the aggregator matches tensors by name
against the previous global model; tied embeddings stay tied), the tokenizer, and
``metrics.json``. It is written into a hidden folder beside ``--out`` and renamed only when
complete, so a failed run leaves no output folder.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xffl_tasks.train.config import ConfigError, TrainingError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
METRICS = "metrics.json"
MAX_HEADER = 100 * 1024 * 1024
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
FLOAT_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class ModelError(ConfigError):
    """The model folder is missing, corrupt or holds pickle weights; the message names the file."""


@dataclass(frozen=True)
class ModelFolder:
    """What :func:`inspect_model_folder` found: the parsed config, the weight files, and each
    tensor's safetensors dtype (``F32``, ``BF16``...) by name."""

    path: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]
    tensors: dict[str, str]

    @property
    def context_length(self) -> int | None:
        for key in CONTEXT_KEYS:
            value = self.config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    @property
    def float_dtype(self) -> str:
        """The most common floating dtype of the weights (``float32``, ``bfloat16``...)."""
        counts: dict[str, int] = {}
        for dtype in self.tensors.values():
            if dtype in FLOAT_DTYPES:
                counts[FLOAT_DTYPES[dtype]] = counts.get(FLOAT_DTYPES[dtype], 0) + 1
        return max(counts, key=counts.get) if counts else "float32"


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file declares (name -> dtype, shape, offsets), checked
    against the file's size so that a truncated or foreign file is caught before loading."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelError(f"{path}: not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER or 8 + length > size:
                raise ModelError(f"{path}: not a safetensors file (bad header length)")
            raw = f.read(length)
    except PermissionError:
        raise ModelError(f"{path}: cannot read the weights: permission denied") from None
    except OSError as error:
        raise ModelError(f"{path}: cannot read the weights: {error.strerror or error}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelError(f"{path}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise ModelError(f"{path}: not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: tensor {name!r}: malformed header entry") from None
        if not isinstance(dtype, str) or not 0 <= start <= stop:
            raise ModelError(f"{path}: tensor {name!r}: malformed header entry")
        end = max(end, stop)
    if 8 + length + end > size:
        raise ModelError(f"{path}: truncated: {size} bytes, the header needs {8 + length + end}")
    return header


def inspect_model_folder(folder: str | Path) -> ModelFolder:
    """Checks a model folder without loading it: config, safetensors weights, no pickles."""
    folder = Path(folder)
    if not folder.exists():
        raise ModelError(f"{folder}: no such model folder")
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a folder (a Hugging Face model folder is expected)")
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{folder}: no config.json: not a Hugging Face model folder") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelError(
            f"{config_path}: cannot read: {getattr(error, 'strerror', None) or error}"
        ) from None
    except json.JSONDecodeError as error:
        raise ModelError(
            f"{config_path}: corrupt: not valid JSON ({error.msg}, line {error.lineno})"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(f"{config_path}: corrupt: no model_type")
    index_path = folder / SAFE_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            shards = sorted({str(v) for v in weight_map.values()})
        except (
            OSError,
            UnicodeDecodeError,
            json.JSONDecodeError,
            KeyError,
            TypeError,
            AttributeError,
        ):
            raise ModelError(f"{index_path}: corrupt: no readable weight_map") from None
        files = tuple(folder / Path(name).name for name in shards)
        for path in files:
            if not path.is_file():
                raise ModelError(f"{index_path}: lists {path.name}, which is missing")
    elif (folder / SAFE_WEIGHTS).is_file():
        files = (folder / SAFE_WEIGHTS,)
    else:
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
        if pickles:
            raise ModelError(
                f"{folder / pickles[0]}: pickle checkpoint refused: only safetensors weights are loaded "
                "(convert it with save_pretrained where it can be trusted)"
            )
        raise ModelError(f"{folder}: no safetensors weights ({SAFE_WEIGHTS} or {SAFE_INDEX})")
    tensors: dict[str, str] = {}
    for path in files:
        for name, info in read_safetensors_header(path).items():
            if name in tensors:
                raise ModelError(f"{path}: tensor {name!r} is also in another shard")
            tensors[name] = info["dtype"]
    if not tensors:
        raise ModelError(f"{folder}: the weights hold no tensors")
    return ModelFolder(folder, config, files, tensors)


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_tokenizer(folder: ModelFolder) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder.path), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any loader failure is one clear line
        raise ModelError(f"{folder.path}: cannot load the tokenizer: {one_line(error)}") from None


def load_model(folder: ModelFolder, **kwargs: Any) -> Any:
    """The model with its weights from safetensors only, in float32 (the master weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(folder.path),
            local_files_only=True,
            use_safetensors=True,
            dtype=torch.float32,
            **kwargs,
        )
    except Exception as error:  # noqa: BLE001
        raise ModelError(f"{folder.path}: cannot load the model: {one_line(error)}") from None


def alias_groups(model: Any) -> list[list[str]]:
    """Names that share one parameter (tied embeddings): ``[["model.embed_tokens.weight",
    "lm_head.weight"]]`` for a LLaMA with tied embeddings."""
    groups: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def state_dict_for_output(
    state: Mapping[str, Any], source: ModelFolder, aliases: list[list[str]]
) -> dict[str, Any]:
    """The tensors to save: one name per tied group (the one the input has), each cast to the
    dtype it had in the input, on the CPU."""
    import torch

    drop: set[str] = set()
    for names in aliases:
        kept = next((n for n in names if n in source.tensors), names[0])
        drop.update(n for n in names if n != kept)
    fallback = getattr(torch, source.float_dtype)
    out = {}
    for name, tensor in state.items():
        if name in drop:
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            input_dtype = source.tensors.get(name)
            tensor = tensor.to(
                getattr(torch, FLOAT_DTYPES[input_dtype])
                if input_dtype in FLOAT_DTYPES
                else fallback
            )
        out[name] = tensor.to("cpu").contiguous()
    return out


def write_model(
    staging: Path,
    *,
    model: Any,
    state: dict[str, Any],
    tokenizer: Any,
    source: ModelFolder,
    max_shard_size: str,
) -> ModelFolder:
    """Saves model and tokenizer into ``staging`` and checks the result against the input:
    the same tensor names, the same dtypes."""
    model.save_pretrained(str(staging), state_dict=state, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(staging))
    # The same model, so the input's config: save_pretrained would record the dtype of the
    # float32 master weights and the training-time use_cache=False.
    (staging / "config.json").write_text(json.dumps(source.config, indent=2, sort_keys=True) + "\n")
    tokenizer_config = staging / "tokenizer_config.json"
    if tokenizer_config.is_file():
        # Loading options that transformers writes back; they describe this run, not the tokenizer.
        settings = json.loads(tokenizer_config.read_text())
        for key in ("is_local", "local_files_only"):
            settings.pop(key, None)
        tokenizer_config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")
    written = inspect_model_folder(staging)
    missing = sorted(set(source.tensors) - set(written.tensors))
    extra = sorted(set(written.tensors) - set(source.tensors))
    changed = sorted(
        n
        for n in source.tensors.keys() & written.tensors.keys()
        if source.tensors[n] != written.tensors[n]
    )
    if missing or extra or changed:
        raise TrainingError(
            "the trained checkpoint does not match the input's tensors: "
            + "; ".join(
                f"{label} {names[:3]}{' ...' if len(names) > 3 else ''}"
                for label, names in (
                    ("missing", missing),
                    ("extra", extra),
                    ("dtype changed", changed),
                )
                if names
            )
        )
    return written


class OutputFolder:
    """The ``--out`` folder, written aside and renamed into place on :meth:`commit`.

    An existing folder is replaced only if it is an earlier output (it holds metrics.json);
    anything else there is refused before training starts.
    """

    def __init__(self, out: str | Path, *, model: Path) -> None:
        self.out = Path(out).absolute()
        if self.out.exists() and (not self.out.is_dir() or not (self.out / METRICS).is_file()):
            raise ConfigError(
                f"--out {self.out}: already exists and is not an earlier training output; refusing to overwrite"
            )
        if (
            self.out.resolve() == Path(model).resolve()
            or Path(model).resolve() in self.out.resolve().parents
        ):
            raise ConfigError(f"--out {self.out}: must not be the model folder or inside it")
        self.staging: Path | None = None

    def create(self) -> Path:
        """Makes the hidden staging folder beside ``out`` (checks that it can be written)."""
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(
                tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent)
            )
        except OSError as error:
            raise ConfigError(
                f"--out {self.out}: cannot write beside it: {error.strerror or error}"
            ) from None
        return self.staging

    def commit(self, metrics: Mapping[str, Any]) -> Path:
        """Writes metrics.json last, then renames the staging folder to ``out``."""
        assert self.staging is not None
        path = self.staging / METRICS
        with open(path, "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        for item in [self.staging, *self.staging.iterdir()]:
            item.chmod(0o755 if item.is_dir() else 0o644)
        previous = None
        if self.out.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, previous / "out")
        os.replace(self.staging, self.out)
        self.staging = None
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return self.out

    def discard(self) -> None:
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
