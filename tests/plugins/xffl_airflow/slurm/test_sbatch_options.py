"""``sbatch.extra`` read as sbatch's getopt_long reads it, and our option table against sbatch.

The first tests are pure (literal cases). The ``real_*`` tests run the installed
``/usr/bin/sbatch`` (Debian's slurm-client) about 1,500 times, each for a few milliseconds: with a
throwaway ``slurm.conf`` whose controller port is closed, no script (stdin is /dev/null) and,
wherever an option could be accepted with a value, an unknown option after it, so getopt stops
sbatch before anything is read or submitted. They read getopt's own messages ("is ambiguous;
possibilities: ...", "requires an argument", "doesn't allow an argument") and are skipped only
where /usr/bin/sbatch is absent.
"""

from __future__ import annotations

import functools
import os
import re
import string
import subprocess
from pathlib import Path

import pytest
from xffl_airflow.slurm import SbatchOptions, SlurmInputError
from xffl_airflow.slurm.sbatch_options import (
    BY_NAME,
    BY_SHORT,
    NONE,
    OPTIONAL,
    REQUIRED,
    RESERVED,
    SBATCH_OPTIONS,
    SLURM_VERSION,
    check_extra,
    check_word,
    long_candidates,
    resolve_extra,
)


def refused(extra: list[str], field: str, *words: str) -> str:
    with pytest.raises(SlurmInputError) as caught:
        SbatchOptions.from_dict({"extra": extra})
    message = str(caught.value)
    assert caught.value.field == field, message
    for word in words:
        assert word in message, message
    return message


# --- literal cases ----------------------------------------------------------------------------

BYPASSES = [
    # unambiguous prefixes of long names
    (["--outp=x"], "--output"),
    (["--chd=/tmp"], "--chdir"),
    (["--arr=0-999"], "--array"),
    (["--comm=x"], "--comment"),
    (["--job=n"], "--job-name"),
    (["--err=x"], "--error"),
    (["--in=x"], "--input"),
    (["--ope=truncate"], "--open-mode"),
    (["--wr=id"], "--wrap"),
    (["--pars"], "--parsable"),
    (["--test"], "--test-only"),
    (["--dep=singleton"], "--dependency"),
    (["--clusters=other"], "--clusters"),
    (["--cluster=other"], "--cluster"),
    (["--uid=0"], "--uid"),
    (["--export=NONE"], "--export"),
    (["--export-f=env.txt"], "--export-file"),
    (["--vers"], "--version"),
    (["--usa"], "--usage"),
    (["--wait"], "--wait"),
    # the value as the next entry
    (["--output", "x"], "--output"),
    (["--outp", "x"], "--output"),
    (["--comment", "xffl/other/run/task/-1"], "--comment"),
    # short letters: separate, glued, bundled
    (["-o", "x"], "-o (--output)"),
    (["-ox"], "-o (--output)"),
    (["-D", "/tmp"], "-D (--chdir)"),
    (["-D/tmp"], "-D (--chdir)"),
    (["-a", "1-3"], "-a (--array)"),
    (["-a1-3"], "-a (--array)"),
    (["-J", "name"], "-J (--job-name)"),
    (["-Jname"], "-J (--job-name)"),
    (["-e", "err"], "-e (--error)"),
    (["-i", "in"], "-i (--input)"),
    (["-d", "singleton"], "-d (--dependency)"),
    (["-M", "other"], "-M (--clusters)"),
    (["-W"], "-W (--wait)"),
    (["-V"], "-V (--version)"),
    (["-h"], "-h (--help)"),
    (["-vvJname"], "-J (--job-name)"),
    (["-vHo", "x"], "-o (--output)"),
    (["-Qox"], "-o (--output)"),
    (["-vh"], "-h (--help)"),
]


@pytest.mark.parametrize(("extra", "option"), BYPASSES, ids=[" ".join(e) for e, _ in BYPASSES])
def test_every_form_of_a_reserved_option_is_refused(extra, option):
    message = refused(extra, "sbatch.extra[0]", repr(extra[0]), f"sbatch's {option}")
    assert "set by the operator" in message


def test_the_message_names_the_entry_and_the_option():
    message = refused(["--exclusive", "--qos", "normal", "--outp=x"], "sbatch.extra[3]")
    assert message == (
        "sbatch.extra[3]: '--outp=x' is sbatch's --output, which xffl sets itself (the log xffl "
        "reads the job's output from); options set by the operator, or that its bookkeeping "
        "relies on, are refused in extra"
    )
    with pytest.raises(SlurmInputError, match=r"^facilities\[1\]\.sbatch\.extra\[1\]: '-ofile' is"):
        SbatchOptions.from_dict({"extra": ["-v", "-ofile"]}, field_prefix="facilities[1].sbatch")


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        (["--c=x"], "sbatch.extra[0]", ["--c is ambiguous", "--comment", "--chdir"]),
        (["--exp=NONE"], "sbatch.extra[0]", ["ambiguous", "--export, --export-file"]),
        (["--wai"], "sbatch.extra[0]", ["ambiguous", "--wait, --wait-all-nodes"]),
        (["--excl"], "sbatch.extra[0]", ["ambiguous", "--exclude, --exclusive"]),
        (["--foo"], "sbatch.extra[0]", ["--foo is not an sbatch option"]),
        (["--=x"], "sbatch.extra[0]", ["is not an sbatch option"]),
        (["-Z"], "sbatch.extra[0]", ["-Z is not an sbatch option"]),
        (["-vZ"], "sbatch.extra[0]", ["-Z is not an sbatch option"]),
        (["--exclusive", "normal"], "sbatch.extra[1]", ["bare word"]),
        (["-"], "sbatch.extra[0]", ["bare word"]),
        (["--"], "sbatch.extra[0]", ["end sbatch's options"]),
        (["--qos"], "sbatch.extra[0]", ["--qos needs a value"]),
        (["-vq"], "sbatch.extra[0]", ["-q needs a value"]),
        (["--hold=1"], "sbatch.extra[0]", ["--hold takes no value"]),
        (["--qos="], "sbatch.extra[0]", ["empty value"]),
        (["--qos", "--output=x"], "sbatch.extra[1]", ["value of --qos", "--qos=VALUE"]),
        (["-q", "-ox"], "sbatch.extra[1]", ["value of -q", "-qVALUE"]),
        (["--qos", "hetjob"], "sbatch.extra[1]", ["het-job"]),
        (["--qos", "PackJob"], "sbatch.extra[1]", ["het-job"]),
        (["--qos=a\nb"], "sbatch.extra[0]", ["control characters"]),
        (["--qos=normal\n"], "sbatch.extra[0]", ["control characters"]),
        (["--qos=a\x00"], "sbatch.extra[0]", ["control characters"]),
        (["--qos=a\u2028"], "sbatch.extra[0]", ["control characters"]),
        (["--qos normal"], "sbatch.extra[0]", ["not an sbatch option word", "one word per entry"]),
        (["--comment=$(id)"], "sbatch.extra[0]", ["not an sbatch option"]),
        (["--constraint=a#b"], "sbatch.extra[0]", ["not an sbatch option"]),
        (["--constraint='a'"], "sbatch.extra[0]", ["not an sbatch option"]),
        ([3], "sbatch.extra[0]", ["must be a string"]),
    ],
)
def test_what_sbatch_would_refuse_or_misread_is_refused(extra, field, words):
    refused(extra, field, *words)


def test_the_first_problem_in_reading_order_is_reported():
    refused(["--outp=x", "--foo"], "sbatch.extra[0]", "--output")
    refused(["--foo", "--outp=x"], "sbatch.extra[0]", "--foo")


@pytest.mark.parametrize(
    "extra",
    [
        ["--exclusive"],
        ["--constraint=gpu"],
        ["--qos=normal"],
        ["--mem-per-cpu=4G"],
        ["--exclusive", "--constraint=gpu", "--qos=normal", "--mem-per-cpu=4G"],
        ["--qos", "normal"],
        ["-q", "normal", "-Cgpu", "-N2", "-vv", "-k"],
        ["--exclus", "--no-req", "--mail-type=END,FAIL", "--signal=B:USR1@60"],
        ["--gres=gpu:a100:4", "--nice=-5", "--exclusive=user", "--get-user-env"],
        ["--tasks-per-node=4", "--hint=nomultithread", "--gid=hpc", "--reservation=r1"],
        ["--cluster-constraint=eu", "--kill-on-invalid-dep=yes", "--hold", "--requeue"],
        ["  --qos=normal  "],
    ],
)
def test_harmless_options_are_accepted(extra):
    options = SbatchOptions.from_dict({"extra": extra})
    assert options.extra == tuple(word.strip() for word in extra)
    assert SbatchOptions.from_dict(options.to_dict()) == options
    assert options.sbatch_options()[-len(extra) :] == list(options.extra)


def test_extra_is_read_as_getopt_reads_it():
    resolved = resolve_extra(["-vN", "2", "--qos", "normal", "-Cgpu", "--exclus", "-k"])
    assert [(r.option.name, r.value, r.index, r.value_index) for r in resolved] == [
        ("verbose", None, 0, 0),
        ("nodes", "2", 0, 1),
        ("qos", "normal", 2, 3),
        ("constraint", "gpu", 4, 4),
        ("exclusive", None, 5, 5),
        ("no-kill", None, 6, 6),
    ]
    assert [r.bundled for r in resolved[:2]] == [True, True]
    assert not resolve_extra(["-ofile"])[0].bundled
    assert check_extra(["--qos", "normal"]) == ("--qos", "normal")
    assert check_word("  -N2 ", "extra[0]") == "-N2"


def test_the_table_is_consistent():
    assert len(BY_NAME) == len(SBATCH_OPTIONS)
    assert len(BY_SHORT) == sum(1 for option in SBATCH_OPTIONS if option.short)
    assert set(RESERVED) <= set(BY_NAME)
    assert {option.arg for option in SBATCH_OPTIONS} == {NONE, REQUIRED, OPTIONAL}
    # Exact names win over longer names they prefix.
    assert long_candidates("mem") == (BY_NAME["mem"],)
    assert long_candidates("cluster") == (BY_NAME["cluster"],)
    assert [option.name for option in long_candidates("clus")] == [
        "cluster",
        "cluster-constraint",
        "clusters",
    ]


# --- the real sbatch --------------------------------------------------------------------------

SBATCH = Path("/usr/bin/sbatch")
needs_sbatch = pytest.mark.skipif(
    not SBATCH.exists(), reason="needs /usr/bin/sbatch (Debian slurm-client, from make setup)"
)
# Follows every probe that could be accepted with a value: getopt stops sbatch at it.
STOP = "--xffl-probe-stop"


class RealSbatch:
    """Asks the installed sbatch's getopt about one argument list at a time."""

    def __init__(self, conf: Path):
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
            "SLURM_CONF": str(conf),
        }

    @functools.lru_cache(maxsize=None)  # noqa: B019 - one instance per test module
    def first_line(self, *args: str) -> tuple[int, str]:
        done = subprocess.run(
            [str(SBATCH), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=30,
        )
        text = (done.stderr.strip() or done.stdout.strip()).splitlines()
        return done.returncode, text[0] if text else ""

    def long_verdict(self, prefix: str) -> tuple[str, set[str]]:
        """``("ambiguous", names)``, ``("unknown", {})`` or ``("unique", {name} or {})``."""
        _, line = self.first_line(f"--{prefix}")
        if "is ambiguous; possibilities:" in line:
            return "ambiguous", set(re.findall(r"'--([^'=]+)'", line.split("possibilities:")[1]))
        if f"unrecognized option '--{prefix}'" in line:
            return "unknown", set()
        named = re.search(r"option '--([^'=]+)' requires an argument", line)
        if named is None:
            _, line = self.first_line(f"--{prefix}=x", STOP)
            named = re.search(r"option '--([^'=]+)' doesn't allow an argument", line)
        return "unique", {named.group(1)} if named else set()

    def long_kind(self, name: str) -> str | None:
        """getopt's argument kind for ``--name`` written in full; None when it is not an option."""
        _, bare = self.first_line(f"--{name}")
        if f"option '--{name}' requires an argument" in bare:
            return REQUIRED
        _, with_value = self.first_line(f"--{name}=x", STOP)
        if f"option '--{name}' doesn't allow an argument" in with_value:
            return NONE
        if "unrecognized option" in bare or "ambiguous" in bare or "requires" in bare:
            return None
        return OPTIONAL

    def short_kind(self, letter: str) -> str | None:
        """getopt's argument kind for ``-letter``; None when it is not an option."""
        code, bare = self.first_line(f"-{letter}")
        if f"invalid option -- '{letter}'" in bare:
            return None
        if f"option requires an argument -- '{letter}'" in bare:
            return REQUIRED
        if code == 0:  # --help, --version: print and exit before reading further letters
            return NONE
        _, glued = self.first_line(f"-{letter}!", STOP)
        return NONE if "invalid option -- '!'" in glued else OPTIONAL

    def listed(self) -> tuple[set[str], dict[str, str]]:
        """Long names in ``sbatch --help`` and ``--usage``, and help's ``-X, --name`` pairs."""
        help_text = subprocess.run(
            [str(SBATCH), "--help"], capture_output=True, text=True, env=self.env, timeout=30
        ).stdout
        usage = subprocess.run(
            [str(SBATCH), "--usage"], capture_output=True, text=True, env=self.env, timeout=30
        ).stdout
        names = set(re.findall(r"^\s+(?:-\w,?\s+)?--([a-z][a-z0-9-]*)", help_text, re.M))
        names |= set(re.findall(r"\[--([a-z][a-z0-9-]*)", usage))
        pairs = dict(re.findall(r"^\s+-(\w),?\s+--([a-z][a-z0-9-]*)", help_text, re.M))
        return names, pairs


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> RealSbatch:
    conf = tmp_path_factory.mktemp("sbatch") / "slurm.conf"
    # No controller listens on port 1; nothing is submitted anyway (see the module docstring).
    conf.write_text("ClusterName=xffl-probe\nSlurmctldHost=localhost\nSlurmctldPort=1\n")
    sbatch = RealSbatch(conf)
    code, version = sbatch.first_line("--version")
    assert code == 0, version
    return sbatch


def real_prefixes(real: RealSbatch) -> dict[str, tuple[str, set[str]]]:
    """getopt's verdict on every one-letter prefix and every proper prefix of a known name."""
    names = set(BY_NAME)
    for letter in string.ascii_lowercase:
        kind, found = real.long_verdict(letter)
        names |= found
    prefixes = set(string.ascii_lowercase)
    prefixes |= {name[:end] for name in names for end in range(1, len(name))}
    return {prefix: real.long_verdict(prefix) for prefix in sorted(prefixes)}


@needs_sbatch
def test_real_sbatch_is_the_version_of_the_table(real):
    _, version = real.first_line("--version")
    assert version == f"slurm-wlm {SLURM_VERSION}", "update SBATCH_OPTIONS for this sbatch"


@needs_sbatch
def test_real_listed_options_are_in_the_table_with_their_short_letter(real):
    names, pairs = real.listed()
    assert len(names) > 90 and len(pairs) > 30, (names, pairs)
    assert sorted(names - set(BY_NAME)) == []
    for letter, name in pairs.items():
        assert BY_NAME[name].short == letter, name
    # Every short letter of the table is in help, so the pairing above covers them all.
    assert sorted(pairs) == sorted(BY_SHORT)


@needs_sbatch
def test_real_argument_kinds_match_the_table(real):
    # sbatch --help's hints are not getopt's table (it shows --wrap[=...] and --export[=...],
    # which require a value, and --container, --get-user-env without one): ask getopt.
    kinds = {option.name: real.long_kind(option.name) for option in SBATCH_OPTIONS}
    assert kinds == {option.name: option.arg for option in SBATCH_OPTIONS}
    shorts = {c: real.short_kind(c) for c in string.ascii_letters + string.digits}
    assert {c: kind for c, kind in shorts.items() if kind} == {
        letter: option.arg for letter, option in BY_SHORT.items()
    }


@needs_sbatch
def test_real_prefixes_resolve_as_the_table_says(real):
    verdicts = real_prefixes(real)
    real_names = set()
    for prefix, (verdict, found) in verdicts.items():
        ours = {option.name for option in long_candidates(prefix)}
        real_names |= found
        if verdict == "ambiguous":
            assert ours == found, prefix
        elif verdict == "unknown":
            assert ours == set(), prefix
        else:
            assert len(ours) == 1 and found <= ours, (prefix, found, ours)
    assert sorted(real_names - set(BY_NAME)) == []


@needs_sbatch
def test_real_ambiguous_prefixes_are_refused(real):
    ambiguous = [p for p, (verdict, _) in real_prefixes(real).items() if verdict == "ambiguous"]
    assert len(ambiguous) > 50
    for prefix in ambiguous:
        with pytest.raises(SlurmInputError, match=f"--{prefix} is ambiguous"):
            check_extra([f"--{prefix}=x"])
        with pytest.raises(SlurmInputError, match=f"--{prefix} is ambiguous"):
            check_extra([f"--{prefix}"])


@needs_sbatch
def test_real_unambiguous_prefixes_of_reserved_options_are_refused(real):
    checked = 0
    for name in RESERVED:
        option = BY_NAME[name]
        for end in range(1, len(name) + 1):
            prefix = name[:end]
            verdict, found = real.long_verdict(prefix)
            if prefix != name and (verdict != "unique" or prefix in BY_NAME):
                continue  # ambiguous, unknown, or exactly another option (--export)
            assert found <= {name}, (prefix, found)
            words = [f"--{prefix}"] if option.arg == NONE else [f"--{prefix}=x"]
            if option.arg == REQUIRED:
                words.append(f"--{prefix} x")
            for word in words:
                with pytest.raises(SlurmInputError, match=f"is sbatch's --{name},"):
                    check_extra(word.split(" "))
            checked += 1
        if option.short:
            with pytest.raises(SlurmInputError, match=f"sbatch's -{option.short} \\(--{name}\\)"):
                check_extra([f"-{option.short}x" if option.arg != NONE else f"-{option.short}"])
    assert checked > len(RESERVED)
