"""sbatch's option table, and reading ``extra`` the way sbatch's getopt_long does.

sbatch collects the words of all ``#SBATCH`` lines into one argument list and hands it to glibc's
``getopt_long``, which accepts far more than ``--name=value``: any unambiguous prefix of a long
name (``--outp`` is ``--output``), the value as the next word (``--output`` then ``x``), short
letters (``-o x``, ``-ox``) and bundles of short flags (``-vHox``). A guard that compared option
names as written could be walked around; this module resolves every word of ``extra`` to the
option sbatch will see and refuses the ones xffl must own (``RESERVED``).

``SBATCH_OPTIONS`` is sbatch's table as installed (Debian's slurm-client ``SLURM_VERSION``);
``tests/.../test_sbatch_options.py`` checks it against the real ``/usr/bin/sbatch``, every prefix
included. glibc calls a prefix that matches several entries of one option (same ``val``) not
ambiguous; no two names of this table that share a prefix are such aliases, so here a prefix
matching two names is ambiguous.
Pure functions only: nothing here runs sbatch.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from xffl_airflow.slurm.errors import SlurmInputError

ArgKind = Literal["none", "required", "optional"]
NONE: ArgKind = "none"
REQUIRED: ArgKind = "required"  # ``--name=value``, ``--name value``, ``-Xvalue``, ``-X value``
OPTIONAL: ArgKind = "optional"  # only ``--name=value`` or ``-Xvalue``; a next word is not taken

SLURM_VERSION = "22.05.8"


@dataclass(frozen=True)
class SbatchOption:
    """One entry of sbatch's getopt_long table: long name, argument kind, short letter."""

    name: str
    arg: ArgKind
    short: str | None = None


SBATCH_OPTIONS: tuple[SbatchOption, ...] = (
    SbatchOption("account", REQUIRED, "A"),
    SbatchOption("acctg-freq", REQUIRED),
    SbatchOption("array", REQUIRED, "a"),
    SbatchOption("batch", REQUIRED),
    SbatchOption("bb", REQUIRED),
    SbatchOption("bbf", REQUIRED),
    SbatchOption("begin", REQUIRED, "b"),
    SbatchOption("chdir", REQUIRED, "D"),
    SbatchOption("cluster", REQUIRED),
    SbatchOption("cluster-constraint", REQUIRED),
    SbatchOption("clusters", REQUIRED, "M"),
    SbatchOption("comment", REQUIRED),
    SbatchOption("constraint", REQUIRED, "C"),
    SbatchOption("container", REQUIRED),
    SbatchOption("context", REQUIRED),
    SbatchOption("contiguous", NONE),
    SbatchOption("core-spec", REQUIRED, "S"),
    SbatchOption("cores-per-socket", REQUIRED),
    SbatchOption("cpu-freq", REQUIRED),
    SbatchOption("cpus-per-gpu", REQUIRED),
    SbatchOption("cpus-per-task", REQUIRED, "c"),
    SbatchOption("deadline", REQUIRED),
    SbatchOption("delay-boot", REQUIRED),
    SbatchOption("dependency", REQUIRED, "d"),
    SbatchOption("distribution", REQUIRED, "m"),
    SbatchOption("error", REQUIRED, "e"),
    SbatchOption("exclude", REQUIRED, "x"),
    SbatchOption("exclusive", OPTIONAL),
    SbatchOption("export", REQUIRED),
    SbatchOption("export-file", REQUIRED),
    SbatchOption("extra-node-info", REQUIRED, "B"),
    SbatchOption("get-user-env", OPTIONAL),
    SbatchOption("gid", REQUIRED),
    SbatchOption("gpu-bind", REQUIRED),
    SbatchOption("gpu-freq", REQUIRED),
    SbatchOption("gpus", REQUIRED, "G"),
    SbatchOption("gpus-per-node", REQUIRED),
    SbatchOption("gpus-per-socket", REQUIRED),
    SbatchOption("gpus-per-task", REQUIRED),
    SbatchOption("gres", REQUIRED),
    SbatchOption("gres-flags", REQUIRED),
    SbatchOption("help", NONE, "h"),
    SbatchOption("hint", REQUIRED),
    SbatchOption("hold", NONE, "H"),
    SbatchOption("ignore-pbs", NONE),
    SbatchOption("input", REQUIRED, "i"),
    SbatchOption("job-name", REQUIRED, "J"),
    SbatchOption("kill-on-invalid-dep", REQUIRED),
    SbatchOption("licenses", REQUIRED, "L"),
    SbatchOption("mail-type", REQUIRED),
    SbatchOption("mail-user", REQUIRED),
    SbatchOption("mcs-label", REQUIRED),
    SbatchOption("mem", REQUIRED),
    SbatchOption("mem-bind", REQUIRED),
    SbatchOption("mem-per-cpu", REQUIRED),
    SbatchOption("mem-per-gpu", REQUIRED),
    SbatchOption("mincpus", REQUIRED),
    SbatchOption("network", REQUIRED),
    SbatchOption("nice", OPTIONAL),
    SbatchOption("no-kill", OPTIONAL, "k"),
    SbatchOption("no-requeue", NONE),
    SbatchOption("nodefile", REQUIRED, "F"),
    SbatchOption("nodelist", REQUIRED, "w"),
    SbatchOption("nodes", REQUIRED, "N"),
    SbatchOption("ntasks", REQUIRED, "n"),
    SbatchOption("ntasks-per-core", REQUIRED),
    SbatchOption("ntasks-per-gpu", REQUIRED),
    SbatchOption("ntasks-per-node", REQUIRED),
    SbatchOption("ntasks-per-socket", REQUIRED),
    SbatchOption("ntasks-per-tres", REQUIRED),
    SbatchOption("open-mode", REQUIRED),
    SbatchOption("output", REQUIRED, "o"),
    SbatchOption("overcommit", NONE, "O"),
    SbatchOption("oversubscribe", NONE, "s"),
    SbatchOption("parsable", NONE),
    SbatchOption("partition", REQUIRED, "p"),
    SbatchOption("power", REQUIRED),
    SbatchOption("prefer", REQUIRED),
    SbatchOption("priority", REQUIRED),
    SbatchOption("profile", REQUIRED),
    SbatchOption("propagate", OPTIONAL),
    SbatchOption("qos", REQUIRED, "q"),
    SbatchOption("quiet", NONE, "Q"),
    SbatchOption("reboot", NONE),
    SbatchOption("requeue", NONE),
    SbatchOption("reservation", REQUIRED),
    SbatchOption("signal", REQUIRED),
    SbatchOption("sockets-per-node", REQUIRED),
    SbatchOption("spread-job", NONE),
    SbatchOption("switches", REQUIRED),
    SbatchOption("tasks-per-node", REQUIRED),
    SbatchOption("test-only", NONE),
    SbatchOption("thread-spec", REQUIRED),
    SbatchOption("threads-per-core", REQUIRED),
    SbatchOption("time", REQUIRED, "t"),
    SbatchOption("time-min", REQUIRED),
    SbatchOption("tmp", REQUIRED),
    SbatchOption("uid", REQUIRED),
    SbatchOption("usage", NONE),
    SbatchOption("use-min-nodes", NONE),
    SbatchOption("verbose", NONE, "v"),
    SbatchOption("version", NONE, "V"),
    SbatchOption("wait", NONE, "W"),
    SbatchOption("wait-all-nodes", REQUIRED),
    SbatchOption("wckey", REQUIRED),
    SbatchOption("wrap", REQUIRED),
)

BY_NAME: Mapping[str, SbatchOption] = {option.name: option for option in SBATCH_OPTIONS}
BY_SHORT: Mapping[str, SbatchOption] = {
    option.short: option for option in SBATCH_OPTIONS if option.short
}

_SETS = "xffl sets itself"
_PRINTS = "would make sbatch print text and exit without submitting the job"
# Refused in ``extra``, whatever form they are written in; each reason completes "..., which".
RESERVED: Mapping[str, str] = {
    # What render_batch_script writes into every job, and what finds the job again.
    "job-name": f"{_SETS} (a restarted task finds its job by this name)",
    "comment": f"{_SETS} (it carries the tag that ties the job to its Airflow task)",
    "chdir": f"{_SETS} (the job's working directory)",
    "output": f"{_SETS} (the log xffl reads the job's output from)",
    "open-mode": f"{_SETS} (append, so a requeued job keeps its earlier output)",
    "error": "would send stderr away from the log xffl reads",
    "input": "would change where the job's standard input comes from",
    "export": (
        "decides which environment reaches the job and its srun steps: xffl exports the job's "
        "env itself, and with --export=NONE or a list srun steps would not see it"
    ),
    "export-file": "would add variables behind the job's env, which xffl exports itself",
    # The job's identity: one task, one job, on the cluster and user xffl queries.
    "array": "would turn the task's one job into many jobs under one tag",
    "clusters": "would submit to a cluster where xffl's squeue, sacct and scancel do not look",
    "cluster": "would submit to a cluster where xffl's squeue, sacct and scancel do not look",
    "uid": "would run the job as another user, whose jobs xffl's lookup (squeue --me) misses",
    "dependency": (
        "would hold the job on other jobs: Airflow orders the tasks, and 'singleton' waits on "
        "the job name xffl sets"
    ),
    # How sbatch itself runs: xffl needs one submitted job and its id on stdout.
    "parsable": "xffl passes itself to read the job id",
    "wrap": "would replace the batch script xffl writes",
    "test-only": "would stop sbatch from submitting the job",
    "wait": "would keep sbatch running until the job ends",
    "help": _PRINTS,
    "usage": _PRINTS,
    "version": _PRINTS,
}

# One word of ``extra`` (an option, or the value after one): safe in an ``#SBATCH`` line, where
# sbatch splits words at whitespace, strips quotes and ends the line at ``#``.
WORD_RE = re.compile(r"^[A-Za-z0-9_.,:/@%+=\[\]-]+$")
WORD_CHARS = "A-Z a-z 0-9 _ . , : / @ % + = [ ] -"
# A line whose first word is one of these starts a new heterogeneous-job component.
_HETJOB_WORDS = ("hetjob", "packjob")


@dataclass(frozen=True)
class ResolvedOption:
    """One option as sbatch reads it from ``extra``.

    :param index: the entry of ``extra`` the option is written in.
    :param word: that entry as written.
    :param option: the option of ``SBATCH_OPTIONS`` it resolves to.
    :param value: its argument, or None.
    :param value_index: the entry the value came from (``index``, or the next one).
    :param bundled: written as one short letter among several (``-vo``).
    """

    index: int
    word: str
    option: SbatchOption
    value: str | None
    value_index: int
    bundled: bool = False

    def describe(self) -> str:
        """``'--outp=x' is sbatch's --output``, in words that say how it was written."""
        name = f"--{self.option.name}"
        if self.word.startswith("--"):
            return f"{self.word!r} is sbatch's {name}"
        letter = f"-{self.option.short} ({name})"
        if self.bundled:
            return f"{self.word!r} holds sbatch's {letter}"
        return f"{self.word!r} is sbatch's {letter}"


def long_candidates(name: str) -> tuple[SbatchOption, ...]:
    """The options getopt_long could mean by ``--name``: the exact one, else every prefix match."""
    exact = BY_NAME.get(name)
    if exact is not None:
        return (exact,)
    return tuple(option for option in SBATCH_OPTIONS if option.name.startswith(name))


def check_word(value: object, field: str) -> str:
    """One entry of ``extra``: a string of one safe word (surrounding spaces are dropped)."""
    if not isinstance(value, str):
        raise SlurmInputError(field, f"must be a string, got {type(value).__name__} {value!r}")
    if not all(char == " " or char.isprintable() for char in value):
        raise SlurmInputError(
            field, f"{value!r} must be one line without control characters (NUL, line breaks)"
        )
    text = value.strip(" ")
    if not WORD_RE.fullmatch(text):
        raise SlurmInputError(
            field,
            f"{text!r} is not an sbatch option word of {WORD_CHARS} (one word per entry: "
            "--name=value, or --name then the value as the next entry)",
        )
    return text


def iter_extra(words: Sequence[str], field: str = "extra") -> Iterator[ResolvedOption]:
    """Reads ``words`` (checked by ``check_word``) as getopt_long reads sbatch's arguments,
    yielding each option in order.

    Refuses what sbatch would refuse or misread: unknown options, ambiguous prefixes, a value
    given to an option that takes none or missing for one that needs it, empty values, bare
    words (sbatch refuses them in a script), and a separate value that looks like an option or
    would start a het-job component. Errors name ``<field>[<index>]``.
    """
    index = 0
    while index < len(words):
        found, index = _resolve_at(words, index, field)
        yield from found


def resolve_extra(words: Sequence[str], field: str = "extra") -> tuple[ResolvedOption, ...]:
    """Every option in ``words``, as ``iter_extra`` reads them."""
    return tuple(iter_extra(words, field))


def check_extra(words: Sequence[str], field: str = "extra") -> tuple[str, ...]:
    """``words`` when every option in them resolves and none is in ``RESERVED``; the first
    problem, in the order sbatch reads them, is raised."""
    for item in iter_extra(words, field):
        reason = RESERVED.get(item.option.name)
        if reason is not None:
            raise SlurmInputError(
                f"{field}[{item.index}]",
                f"{item.describe()}, which {reason}; options set by the operator, or that its "
                "bookkeeping relies on, are refused in extra",
            )
    return tuple(words)


def _resolve_at(words: Sequence[str], index: int, field: str) -> tuple[list[ResolvedOption], int]:
    """The options in ``words[index]`` (and its separate value), and the next index to read."""
    word = words[index]
    where = f"{field}[{index}]"
    if word == "--":
        raise SlurmInputError(where, "'--' would end sbatch's options: leave it out")
    if not word.startswith("-") or word == "-":
        raise SlurmInputError(
            where,
            f"{word!r} is not an sbatch option (sbatch refuses a bare word among #SBATCH "
            "options); give a value as --name=value or right after its option",
        )
    if word.startswith("--"):
        return _resolve_long(words, index, field)
    return _resolve_short(words, index, field)


def _resolve_long(words: Sequence[str], index: int, field: str) -> tuple[list[ResolvedOption], int]:
    word = words[index]
    where = f"{field}[{index}]"
    name, has_value, value = word[2:].partition("=")
    candidates = long_candidates(name) if name else ()
    if not candidates:
        raise SlurmInputError(where, f"{word!r}: --{name} is not an sbatch option")
    if len(candidates) > 1:
        names = ", ".join(f"--{option.name}" for option in candidates)
        raise SlurmInputError(
            where,
            f"{word!r}: --{name} is ambiguous in sbatch (it could be {names}); write the option "
            "in full",
        )
    option = candidates[0]
    if has_value:
        if option.arg == NONE:
            raise SlurmInputError(where, f"{word!r}: sbatch's --{option.name} takes no value")
        _check_value(value, where, word)
        return [ResolvedOption(index, word, option, value, index)], index + 1
    if option.arg == REQUIRED:
        value = _next_value(words, index, field, f"--{option.name}")
        return [ResolvedOption(index, word, option, value, index + 1)], index + 2
    return [ResolvedOption(index, word, option, None, index)], index + 1


def _resolve_short(
    words: Sequence[str], index: int, field: str
) -> tuple[list[ResolvedOption], int]:
    word = words[index]
    where = f"{field}[{index}]"
    found: list[ResolvedOption] = []
    for position in range(1, len(word)):
        letter = word[position]
        option = BY_SHORT.get(letter)
        if option is None:
            raise SlurmInputError(where, f"{word!r}: -{letter} is not an sbatch option")
        rest = word[position + 1 :]
        # Bundled: other letters share the word (``-vo``), not a glued value (``-ofile``).
        bundled = position > 1 or (option.arg == NONE and bool(rest))
        if option.arg == NONE:
            found.append(ResolvedOption(index, word, option, None, index, bundled))
            continue
        if rest:
            _check_value(rest, where, word)
            found.append(ResolvedOption(index, word, option, rest, index, bundled))
            return found, index + 1
        if option.arg == OPTIONAL:
            found.append(ResolvedOption(index, word, option, None, index, bundled))
            return found, index + 1
        value = _next_value(words, index, field, f"-{letter}")
        found.append(ResolvedOption(index, word, option, value, index + 1, bundled))
        return found, index + 2
    return found, index + 1


def _check_value(value: str, where: str, word: str) -> None:
    if not value:
        raise SlurmInputError(where, f"{word!r} gives an empty value")


def _next_value(words: Sequence[str], index: int, field: str, option: str) -> str:
    """The entry after ``words[index]``, which sbatch takes as ``option``'s value."""
    if index + 1 >= len(words):
        raise SlurmInputError(
            f"{field}[{index}]",
            f"{words[index]!r}: sbatch's {option} needs a value (--name=value, or the value as "
            "the next entry)",
        )
    value = words[index + 1]
    where = f"{field}[{index + 1}]"
    if value.startswith("-"):
        glued = f"{option}=VALUE" if option.startswith("--") else f"{option}VALUE"
        raise SlurmInputError(
            where,
            f"{value!r} would be taken as the value of {option} in {field}[{index}]; write "
            f"{glued} if that is meant",
        )
    if value.lower() in _HETJOB_WORDS:
        raise SlurmInputError(
            where, f"{value!r} alone on an #SBATCH line starts a het-job component, not a value"
        )
    return value
