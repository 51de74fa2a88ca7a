"""Where this process sits in a distributed run: rank, local rank, world size, rendezvous.

The training task runs alone (one process, CPU or one GPU), as one of many under ``torchrun``
(which sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), or as
one task of an ``srun`` step (which sets ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``
and the node list). :func:`resolve_launch` reads either from an environment mapping and
:func:`export_launch` writes the usual variables for ``torch.distributed``'s ``env://``.
Everything here is pure (no torch), so it is tested on literal environments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from itertools import product
from typing import Literal

DEFAULT_MASTER_PORT = 29500
# Under Slurm without a port given, the port is derived from the job id so that two jobs
# sharing a node do not collide: SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 20000
MAX_HOSTS = 100_000

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class LaunchError(ValueError):
    """The launcher's environment is inconsistent; the message names the variable."""


@dataclass(frozen=True)
class DistributedLaunch:
    """This process's place in the run. ``source`` says who started it."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: Literal["single", "torchrun", "slurm"]

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _expand_ranges(body: str, nodelist: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]`` (the width of each start number kept)."""
    values: list[str] = []
    for part in body.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise LaunchError(f"node list {nodelist!r}: bad range {part!r} in [{body}]")
        start_text, end_text = match.group(1), match.group(2)
        start = int(start_text)
        end = int(end_text) if end_text is not None else start
        if end < start:
            raise LaunchError(f"node list {nodelist!r}: range {part!r} runs backwards")
        if end - start + len(values) >= MAX_HOSTS:
            raise LaunchError(f"node list {nodelist!r}: more than {MAX_HOSTS} hosts")
        width = len(start_text)
        values.extend(str(number).zfill(width) for number in range(start, end + 1))
    return values


def _split_top_level(nodelist: str) -> list[str]:
    """Splits at the commas outside brackets: ``a[1,2],b`` -> ``["a[1,2]", "b"]``."""
    entries, depth, current = [], 0, []
    for char in nodelist:
        if char == "[":
            depth += 1
            if depth > 1:
                raise LaunchError(f"node list {nodelist!r}: nested brackets")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise LaunchError(f"node list {nodelist!r}: ']' without '['")
        if char == "," and depth == 0:
            entries.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise LaunchError(f"node list {nodelist!r}: '[' without ']'")
    entries.append("".join(current))
    return entries


def expand_nodelist(nodelist: str) -> list[str]:
    """Expands a Slurm host list, as ``scontrol show hostnames`` does.

    ``node[01-04,07]`` -> node01..node04, node07; ``a1,b[2-3]`` -> a1, b2, b3;
    ``rack[1-2]-n[1-2]`` -> rack1-n1, rack1-n2, rack2-n1, rack2-n2.
    """
    if not nodelist or not nodelist.strip():
        raise LaunchError("node list is empty")
    hosts: list[str] = []
    for entry in _split_top_level(nodelist.strip()):
        entry = entry.strip()
        if not entry:
            raise LaunchError(f"node list {nodelist!r}: empty entry")
        pieces = re.split(r"\[([^\]]*)\]", entry)
        # pieces alternate: literal, bracket body, literal, bracket body, ..., literal
        choices = [
            [piece] if index % 2 == 0 else _expand_ranges(piece, nodelist)
            for index, piece in enumerate(pieces)
        ]
        for combination in product(*choices):
            hosts.append("".join(combination))
            if len(hosts) > MAX_HOSTS:
                raise LaunchError(f"node list {nodelist!r}: more than {MAX_HOSTS} hosts")
    return hosts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list (where rank 0 runs in a whole-allocation step)."""
    return expand_nodelist(nodelist)[0]


def _int(environ: Mapping[str, str], name: str, *, minimum: int = 0) -> int:
    text = environ.get(name)
    if text is None:
        raise LaunchError(f"{name} is not set")
    try:
        value = int(text.strip())
    except ValueError:
        raise LaunchError(f"{name}={text!r} is not a whole number") from None
    if value < minimum:
        raise LaunchError(f"{name}={value} must be at least {minimum}")
    return value


def _port(value: int, name: str) -> int:
    if not 1 <= value <= 65535:
        raise LaunchError(f"{name}={value} is not a TCP port (1-65535)")
    return value


def tasks_per_node(text: str) -> int:
    """The first count of ``SLURM_STEP_TASKS_PER_NODE``/``SLURM_TASKS_PER_NODE``: ``4(x2),3`` -> 4."""
    match = re.match(r"^\s*(\d+)", text or "")
    if not match:
        raise LaunchError(f"tasks per node {text!r} is not of the form N or N(xM)")
    return int(match.group(1))


def slurm_master_port(environ: Mapping[str, str]) -> int:
    """A rendezvous port for a Slurm job: MASTER_PORT if set, else derived from the job id."""
    if environ.get("MASTER_PORT"):
        return _port(_int(environ, "MASTER_PORT", minimum=1), "MASTER_PORT")
    if environ.get("SLURM_JOB_ID"):
        return SLURM_PORT_BASE + _int(environ, "SLURM_JOB_ID") % SLURM_PORT_SPAN
    return DEFAULT_MASTER_PORT


def resolve_launch(
    environ: Mapping[str, str], *, master_port: int | None = None
) -> DistributedLaunch:
    """Reads this process's rank and rendezvous from the environment.

    1. ``RANK`` and ``WORLD_SIZE`` set (``torchrun`` or any ``env://`` launcher): taken as they
       are; ``MASTER_ADDR``/``MASTER_PORT`` must be set when there is more than one process.
    2. Inside an ``srun`` step (``SLURM_STEP_ID`` and ``SLURM_PROCID`` set): rank from
       ``SLURM_PROCID``, local rank from ``SLURM_LOCALID``, world size from
       ``SLURM_STEP_NUM_TASKS`` (else ``SLURM_NTASKS``), master address the first host of
       ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``, ``SLURM_NODELIST``); the port is
       ``master_port``, else ``MASTER_PORT``, else derived from ``SLURM_JOB_ID``. A batch
       script's own shell (no ``srun``) is not a step, so it runs alone.
    3. Otherwise one process alone.
    """
    if master_port is not None:
        _port(master_port, "master_port")
    if "RANK" in environ and "WORLD_SIZE" in environ:
        world_size = _int(environ, "WORLD_SIZE", minimum=1)
        rank = _int(environ, "RANK")
        if rank >= world_size:
            raise LaunchError(f"RANK={rank} is not below WORLD_SIZE={world_size}")
        local_rank = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else 0
        local_world = (
            _int(environ, "LOCAL_WORLD_SIZE", minimum=1) if "LOCAL_WORLD_SIZE" in environ else 1
        )
        if world_size > 1 and not environ.get("MASTER_ADDR"):
            raise LaunchError("MASTER_ADDR is not set (WORLD_SIZE > 1)")
        if world_size > 1 and not environ.get("MASTER_PORT"):
            raise LaunchError("MASTER_PORT is not set (WORLD_SIZE > 1)")
        port = (
            _port(_int(environ, "MASTER_PORT", minimum=1), "MASTER_PORT")
            if environ.get("MASTER_PORT")
            else DEFAULT_MASTER_PORT
        )
        return DistributedLaunch(
            rank=rank,
            local_rank=local_rank,
            world_size=world_size,
            local_world_size=local_world,
            master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
            master_port=port,
            source="torchrun",
        )
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ:
        size_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
        world_size = _int(environ, size_name, minimum=1)
        rank = _int(environ, "SLURM_PROCID")
        if rank >= world_size:
            raise LaunchError(f"SLURM_PROCID={rank} is not below {size_name}={world_size}")
        if world_size > 1:
            list_name = next(
                (
                    n
                    for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                    if environ.get(n)
                ),
                None,
            )
            if list_name is None:
                raise LaunchError("SLURM_JOB_NODELIST is not set (more than one Slurm task)")
            try:
                master_addr = first_host(environ[list_name])
            except LaunchError as error:
                raise LaunchError(f"{list_name}: {error}") from None
        else:
            master_addr = "127.0.0.1"
        per_node_name = (
            "SLURM_STEP_TASKS_PER_NODE"
            if "SLURM_STEP_TASKS_PER_NODE" in environ
            else "SLURM_TASKS_PER_NODE"
        )
        local_world = tasks_per_node(environ[per_node_name]) if environ.get(per_node_name) else 1
        return DistributedLaunch(
            rank=rank,
            local_rank=_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0,
            world_size=world_size,
            local_world_size=local_world,
            master_addr=master_addr,
            master_port=master_port if master_port is not None else slurm_master_port(environ),
            source="slurm",
        )
    port = master_port
    if port is None:
        port = (
            _port(_int(environ, "MASTER_PORT", minimum=1), "MASTER_PORT")
            if environ.get("MASTER_PORT")
            else DEFAULT_MASTER_PORT
        )
    return DistributedLaunch(
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        master_addr="127.0.0.1",
        master_port=port,
        source="single",
    )


def export_launch(launch: DistributedLaunch, environ: MutableMapping[str, str]) -> None:
    """Writes the variables ``torch.distributed.init_process_group(init_method="env://")`` reads."""
    environ.update(
        {
            "RANK": str(launch.rank),
            "LOCAL_RANK": str(launch.local_rank),
            "WORLD_SIZE": str(launch.world_size),
            "LOCAL_WORLD_SIZE": str(launch.local_world_size),
            "MASTER_ADDR": launch.master_addr,
            "MASTER_PORT": str(launch.master_port),
        }
    )
