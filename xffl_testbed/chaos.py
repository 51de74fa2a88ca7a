"""A chaos campaign's pure parts: the seeded fault schedule and the checks of its outcome.

The live part (``benchmarks/chaos_campaign.py``) runs a calm campaign, then the same campaign
under the faults ``fault_schedule`` draws, and hands what it saw to the checks here as plain
data: the facilities' Slurm completion logs, the file names left in storage and workdirs, the
final global models' hashes. Nothing here starts a process or reads a file.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

# The faults, by kind. ``kill_<component>`` SIGKILLs one Airflow component; ``kill_task``
# SIGKILLs the process of a running task; ``sshd_outage`` stops a facility's sshd for
# ``duration_s``; ``slurmctld_restart`` stops a facility's slurmctld for ``duration_s``.
COMPONENT_KILLS = {
    "kill_scheduler": "scheduler",
    "kill_triggerer": "triggerer",
    "kill_dag_processor": "dag-processor",
}
FAULT_KINDS = (*COMPONENT_KILLS, "kill_task", "sshd_outage", "slurmctld_restart")
# The tasks a ``kill_task`` fault may hit (push and pull: any facility's).
TASK_KINDS = ("push", "pull", "aggregate", "finalize")


@dataclass(frozen=True)
class Fault:
    """One fault: due ``at_s`` seconds after the campaign started.

    :param kind: one of ``FAULT_KINDS``.
    :param target: the component (``scheduler``), the task (``push``, ``pull``: of any
        facility; ``aggregate``, ``finalize``) or the facility the fault hits.
    :param duration_s: how long a stopped daemon stays down (0 for kills).
    :param delay_s: for ``kill_task``, how long the task has run when it is killed.
    """

    at_s: float
    kind: str
    target: str
    duration_s: float = 0.0
    delay_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def fault_schedule(
    seed: int,
    counts: Mapping[str, int],
    *,
    horizon_s: float,
    facilities: Sequence[str],
    start_s: float = 5.0,
    outage_s: tuple[float, float] = (3.0, 12.0),
    task_delay_s: tuple[float, float] = (0.0, 0.4),
) -> list[Fault]:
    """The faults of one chaos run, in time order; the same seed gives the same schedule.

    The window ``[start_s, horizon_s]`` is cut into one slot per fault and each fault falls at
    a random moment of its slot (so faults spread over the whole campaign); which kind goes to
    which slot, the targets and the durations are drawn from ``seed`` too.
    """
    unknown = sorted(set(counts) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}; known: {list(FAULT_KINDS)}")
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"fault counts must be >= 0, got {dict(counts)}")
    if not facilities:
        raise ValueError("a chaos run needs at least one facility")
    if horizon_s <= start_s:
        raise ValueError(f"horizon_s ({horizon_s}) must be after start_s ({start_s})")
    rng = random.Random(seed)
    kinds = [kind for kind in FAULT_KINDS for _ in range(counts.get(kind, 0))]
    rng.shuffle(kinds)
    # task kills go round the task kinds (each once before any twice), in a seeded order
    tasks = [
        task
        for _ in range(counts.get("kill_task", 0) // len(TASK_KINDS) + 1)
        for task in TASK_KINDS
    ]
    for start in range(0, len(tasks), len(TASK_KINDS)):
        block = tasks[start : start + len(TASK_KINDS)]
        rng.shuffle(block)
        tasks[start : start + len(TASK_KINDS)] = block
    slot = (horizon_s - start_s) / max(len(kinds), 1)
    faults = []
    for index, kind in enumerate(kinds):
        at = round(start_s + slot * (index + rng.random()), 2)
        if kind in COMPONENT_KILLS:
            faults.append(Fault(at, kind, COMPONENT_KILLS[kind]))
        elif kind == "kill_task":
            faults.append(
                Fault(at, kind, tasks.pop(0), delay_s=round(rng.uniform(*task_delay_s), 2))
            )
        else:
            faults.append(
                Fault(
                    at,
                    kind,
                    rng.choice(list(facilities)),
                    duration_s=round(rng.uniform(*outage_s), 1),
                )
            )
    return faults


def parse_counts(text: str) -> dict[str, int]:
    """``kill_scheduler=2,sshd_outage=1`` -> ``{"kill_scheduler": 2, "sshd_outage": 1}``."""
    counts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, sep, number = item.partition("=")
        if not sep or kind not in FAULT_KINDS or not number.isdigit():
            raise ValueError(
                f"fault count {item!r}: write KIND=N with KIND one of {list(FAULT_KINDS)}"
            )
        counts[kind] = int(number)
    return counts


# -- the outcome's checks --------------------------------------------------------------

_JOBCOMP_FIELD = re.compile(r"(\w+)=(\S*)")
_ROUND_JOBS = re.compile(r"/(?P<campaign>[a-z][a-z0-9_-]{0,63})/round-(?P<round>\d{4,})/jobs/?$")


def parse_jobcomp(text: str) -> list[dict[str, str]]:
    """The records of a Slurm completion log (``JobCompType=jobcomp/filetxt``), one dict each."""
    return [dict(_JOBCOMP_FIELD.findall(line)) for line in text.splitlines() if "JobId=" in line]


def jobs_per_round(records: Iterable[Mapping[str, str]], campaign: str) -> dict[int, list[str]]:
    """The distinct job ids each round of ``campaign`` ran at one facility, from the jobs'
    working directory (``<workdir>/<dag id>/<campaign>/round-NNNN/jobs``, where our batch scripts
    run)."""
    found: dict[int, list[str]] = {}
    for record in records:
        match = _ROUND_JOBS.search(record.get("WorkDir", ""))
        if match and match["campaign"] == campaign:
            ids = found.setdefault(int(match["round"]), [])
            if record["JobId"] not in ids:
                ids.append(record["JobId"])
    return dict(sorted(found.items()))


def job_count_problems(jobs: Mapping[str, Mapping[int, Sequence[str]]], rounds: int) -> list[str]:
    """Each of ``rounds`` rounds must have run exactly one job at each facility."""
    problems = []
    for facility, per_round in sorted(jobs.items()):
        for number in range(rounds):
            ids = list(per_round.get(number, []))
            if len(ids) != 1:
                problems.append(
                    f"{facility} round {number}: {len(ids)} Slurm jobs {ids}, expected 1"
                )
        extra = sorted(set(per_round) - set(range(rounds)))
        if extra:
            problems.append(f"{facility}: jobs of rounds {extra} beyond the {rounds} rounds")
    return problems


# Temporary names our writers use: transfers (``.NAME.xffl-part``), staged output folders
# (``.NAME.partial-XXXX``, ``.NAME.tmp-XXXX``), the batch script's end record
# (``NAME.PID.tmp``), atomic JSON and report writes (mkstemp: ``.NAME.XXXXXXXX[.suffix]``), a
# retried aggregation's folder set aside (``global.stale-SECONDS``), and the usual ``*.part``.
_PARTIAL_NAMES = (
    re.compile(r"^\..+\.xffl-part$"),
    re.compile(r"^\..+\.(partial|tmp)-[A-Za-z0-9_]+$"),
    re.compile(r"\.tmp$"),
    re.compile(r"\.part$"),
    re.compile(r"^\..+\.[A-Za-z0-9_]{8}(\.[A-Za-z0-9]+)?$"),
    re.compile(r"^global\.stale-\d+$"),
)


def is_partial_name(name: str) -> bool:
    """Whether a file or folder name is one of our writers' unfinished names."""
    return any(pattern.search(name) for pattern in _PARTIAL_NAMES)


def partial_paths(paths: Iterable[str]) -> list[str]:
    """The paths (any depth) whose last component is an unfinished name, sorted."""
    return sorted(p for p in paths if is_partial_name(p.rstrip("/").rsplit("/", 1)[-1]))


# Files of a global model folder that are about the aggregation, not the model.
NOT_MODEL = frozenset({"aggregation.json"})


def model_digest(file_hashes: Mapping[str, str]) -> str:
    """One sha256 for a model folder, from ``{relative path: sha256}`` of its files.

    Only the model counts: the aggregation's report (timings) and the server optimiser's state
    folder are left out.
    """
    lines = sorted(
        f"{path}\t{digest}" for path, digest in file_hashes.items()
        if path not in NOT_MODEL and not path.startswith("server_state/")
    )  # fmt: skip
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def outcome_problems(
    *,
    rounds: int,
    run_states: Sequence[str],
    calm_digest: str | None,
    chaos_digest: str | None,
    jobs: Mapping[str, Mapping[int, Sequence[str]]],
    partial: Sequence[str],
    verify_rc: int,
) -> list[str]:
    """Everything that differs from a calm campaign's promise; empty when the run kept it."""
    problems = []
    if list(run_states) != ["success"] * rounds:
        problems.append(f"round runs ended {list(run_states)}, expected {rounds} x success")
    if calm_digest is None or chaos_digest != calm_digest:
        problems.append(
            f"final global model sha256 {chaos_digest} differs from the calm run's {calm_digest}"
        )
    problems += job_count_problems(jobs, rounds)
    if partial:
        problems.append(f"{len(partial)} unfinished file(s) left: {list(partial)[:10]}")
    if verify_rc != 0:
        problems.append(f"the manifest chain does not verify (xffl_tasks.verify exit {verify_rc})")
    return problems
