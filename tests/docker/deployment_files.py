"""Pure readers of the deployment files (Dockerfiles, the Makefile, shell scripts, env files,
compose entries): text in, plain data out; and ``Findings``, the list of problems the checks
add to. No file is opened here."""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Dockerfile:
    path: str  # relative to the repository root
    instructions: list[tuple[str, str]]
    copied: dict[str, str] = field(default_factory=dict)  # image path -> source (context-relative)
    env: dict[str, str] = field(default_factory=dict)
    expose: set[str] = field(default_factory=set)
    entrypoint: list[str] = field(default_factory=list)

    def runs(self) -> list[str]:
        return [args for op, args in self.instructions if op == "RUN"]


def parse_dockerfile(text: str, path: str) -> Dockerfile:
    """Instructions (continuation lines joined), with COPY targets, ENV, EXPOSE and ENTRYPOINT read."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        op, _, args = pending.strip().partition(" ")
        instructions.append((op.upper(), args.strip()))
        pending = ""
    parsed = Dockerfile(path, instructions)
    for op, args in instructions:
        if op == "COPY":
            words = json.loads(args) if args.startswith("[") else shlex.split(args)
            words = [w for w in words if not w.startswith("--")]
            *sources, dest = words
            for source in sources:
                # A folder (written with a trailing /) lands as the destination itself.
                if source.endswith("/") or not (dest.endswith("/") or len(sources) > 1):
                    target = dest.rstrip("/") or "/"
                else:
                    target = dest.rstrip("/") + "/" + Path(source).name
                parsed.copied[target] = source
        elif op == "ENV":
            for word in shlex.split(args):
                key, _, value = word.partition("=")
                parsed.env[key] = value
        elif op == "EXPOSE":
            parsed.expose |= {p.split("/")[0] for p in args.split()}
        elif op == "ENTRYPOINT":
            parsed.entrypoint = json.loads(args)
    return parsed


def pip_installs(dockerfile: Dockerfile) -> list[str]:
    """Every ``pip install ...`` command of the RUN lines, as the text after ``install``."""
    found = []
    for run in dockerfile.runs():
        for command in re.split(r"&&|;", run):
            match = re.search(r"\bpip install (.*)", command)
            if match:
                found.append(match.group(1).strip())
    return found


def makefile_locks(makefile: str) -> dict[str, str]:
    """The lock file each virtualenv rule of the Makefile installs: ``{"VENV": ..., "FACILITY_VENV": ...}``."""
    locks = {}
    for var in ("VENV", "FACILITY_VENV"):
        match = re.search(rf"\$\({var}\)/bin/pip install .*?-r (\S+)", makefile)
        if match:
            locks[var] = match.group(1)
    return locks


def shell_functions(script: str) -> set[str]:
    return set(re.findall(r"^(\w+)\(\)\s*\{", script, re.MULTILINE))


def shell_calls(script: str, names: set[str] | tuple[str, ...]) -> set[str]:
    """The names of ``names`` that ``script`` calls (outside comments and function definitions)."""
    code = "\n".join(line.split("#", 1)[0] for line in script.splitlines())
    return {
        name
        for name in names
        if re.search(rf"(^|[\s;&|(]){re.escape(name)}(\s|$|;)", code, re.MULTILINE)
    }


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; a value in single quotes is taken literally, as compose does."""
    env = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def as_dict(environment) -> dict[str, str]:
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {k: "" if v is None else str(v) for k, v in (environment or {}).items()}


def service_argv(spec) -> list[str]:
    return spec if isinstance(spec, list) else shlex.split(spec or "")


def mount_for(service: dict, path: str) -> tuple[str, str] | None:
    """``(source, target)`` of the mount that holds ``path`` in ``service``."""
    best = None
    for volume in service.get("volumes") or []:
        if not isinstance(volume, str) or ":" not in volume:
            continue
        source, target = volume.split(":")[:2]
        if (path == target or path.startswith(target.rstrip("/") + "/")) and (
            best is None or len(target) > len(best[1])
        ):
            best = (source, target)
    return best


class Findings:
    def __init__(self, docker_dir: Path):
        self.docker = docker_dir
        self.repo = docker_dir.parent
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def rel(self, path: Path) -> str:
        try:
            return str(Path(os.path.normpath(path)).relative_to(os.path.normpath(self.repo)))
        except ValueError:
            return str(path)
