"""Per-facility sbatch settings: a typed, validated dataclass built from a plain dict (YAML)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from xffl_airflow.slurm import validation as v
from xffl_airflow.slurm.errors import SlurmInputError
from xffl_airflow.slurm.sbatch_options import check_extra, check_word


def _positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SlurmInputError(name, f"must be a whole number, got {type(value).__name__} {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise SlurmInputError(name, f"must be a whole number, got {value!r}") from None
    if number < minimum:
        raise SlurmInputError(name, f"must be at least {minimum}, got {number}")
    return number


def _pattern(value: Any, name: str, regex, what: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SlurmInputError(name, f"must be {what}, got {type(value).__name__} {value!r}")
    text = str(value).strip()
    if not regex.fullmatch(text):
        raise SlurmInputError(name, f"{text!r} is not {what}")
    return text


@dataclass(frozen=True)
class SbatchOptions:
    """What a facility needs in ``#SBATCH`` lines, and the shell lines that prepare the job.

    :param partition: ``--partition``; None leaves the cluster's default.
    :param account: ``--account``.
    :param qos: ``--qos``.
    :param nodes: ``--nodes``: a count or a range such as ``"2-4"``.
    :param ntasks_per_node: ``--ntasks-per-node``.
    :param cpus_per_task: ``--cpus-per-task``.
    :param gpus_per_node: ``--gpus-per-node``: a count or ``"type:count"`` (``"a100:4"``).
    :param mem: ``--mem`` per node, such as ``"64G"``.
    :param time: ``--time`` limit in a Slurm format (``"30"``, ``"0:01"``, ``"1-12:00:00"``), or
        whole minutes as an int.
    :param extra: further sbatch options, one word per entry (``--name=value``, ``--name`` then
        the value, short ``-X value`` or ``-Xvalue``), read as sbatch's getopt_long reads them
        (``sbatch_options``): unknown or ambiguous options are refused, and so is every option
        the operator sets itself or relies on (``sbatch_options.RESERVED``: ``--job-name``,
        ``--output``, ``--array``, ...), whatever prefix or short form names it.
    :param preamble: shell lines run before the command (module loads, virtualenv activation).
        They are the facility owner's own shell code, written into the script as given: never
        build them from untrusted input.
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: str | None = None
    ntasks_per_node: int | None = None
    cpus_per_task: int | None = None
    gpus_per_node: str | None = None
    mem: str | None = None
    time: str | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)
    preamble: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        # Normalise and validate in place (frozen: go through object.__setattr__).
        checked = _validated(self)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any] | None, *, field_prefix: str = "sbatch"
    ) -> SbatchOptions:
        """Builds options from a plain mapping (YAML); errors name ``<field_prefix>.<field>``."""
        if data is None:
            return cls()
        if isinstance(data, SbatchOptions):
            return data
        if not isinstance(data, Mapping):
            raise SlurmInputError(
                field_prefix, f"must be a mapping of sbatch settings, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise SlurmInputError(
                f"{field_prefix}.{unknown[0]}",
                f"unknown sbatch setting; known are {', '.join(sorted(known))}",
            )
        try:
            return cls(**{k: data[k] for k in data if data[k] is not None})
        except SlurmInputError as error:
            raise SlurmInputError(f"{field_prefix}.{error.field}", error.detail) from None

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-safe dict that ``from_dict`` reads back to equal options."""
        data = asdict(self)
        data["extra"] = list(self.extra)
        data["preamble"] = list(self.preamble)
        return {k: val for k, val in data.items() if val not in (None, [])}

    def sbatch_options(self) -> list[str]:
        """The ``--option=value`` strings for the ``#SBATCH`` lines, in a fixed order."""
        pairs = [
            ("partition", self.partition),
            ("account", self.account),
            ("qos", self.qos),
            ("nodes", self.nodes),
            ("ntasks-per-node", self.ntasks_per_node),
            ("cpus-per-task", self.cpus_per_task),
            ("gpus-per-node", self.gpus_per_node),
            ("mem", self.mem),
            ("time", self.time),
        ]
        return [f"--{name}={value}" for name, value in pairs if value is not None] + list(
            self.extra
        )


def _validated(options: SbatchOptions) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("partition", "account", "qos"):
        value = getattr(options, name)
        out[name] = None if value is None else v.check_slurm_name(value, name)
    out["nodes"] = (
        None
        if options.nodes is None
        else _pattern(options.nodes, "nodes", v.NODES_RE, "a node count or range such as 2 or 2-4")
    )
    for name in ("ntasks_per_node", "cpus_per_task"):
        value = getattr(options, name)
        out[name] = None if value is None else _positive_int(value, name)
    out["gpus_per_node"] = (
        None
        if options.gpus_per_node is None
        else _pattern(
            options.gpus_per_node,
            "gpus_per_node",
            v.GPUS_RE,
            "a GPU count or type:count such as a100:4",
        )
    )
    out["mem"] = (
        None
        if options.mem is None
        else _pattern(options.mem, "mem", v.MEM_RE, "a memory size such as 64G or 4000M")
    )
    if options.time is None:
        out["time"] = None
    elif isinstance(options.time, int) and not isinstance(options.time, bool):
        out["time"] = str(_positive_int(options.time, "time"))
    else:
        text = str(options.time).strip() if isinstance(options.time, str) else options.time
        if text in ("UNLIMITED", "INFINITE"):
            out["time"] = text
        else:
            out["time"] = _pattern(
                text,
                "time",
                v.TIME_RE,
                "a Slurm time limit such as 30, 0:01, 2:00:00 or 1-12:00:00",
            )
    out["extra"] = check_extra(_string_list(options.extra, "extra", check_word), "extra")
    out["preamble"] = _string_list(options.preamble, "preamble", v.check_shell_line)
    return out


def _string_list(values: Any, name: str, check) -> tuple[str, ...]:
    if values is None:
        return ()
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise SlurmInputError(name, f"must be a list of strings, got {type(values).__name__}")
    return tuple(check(item, f"{name}[{i}]") for i, item in enumerate(values))
