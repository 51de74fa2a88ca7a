"""Push and pull against a real facility: OpenSSH's sshd of the local test bed, host key pinned.

Starts: the session's ``testbed`` (local facilities ``site1`` and ``site2``: slurmctld, slurmd
and sshd each, stopped by PID at the end of the session). Some tests stop and restart site1's
sshd (``Facility.stop_sshd``/``start_sshd``), mount a small tmpfs inside its workdir (unmounted
at the end of the test) or chmod a remote folder; each test works in a folder of its own under
the workdir and removes it afterwards. The model is a real (tiny) transformers GPT-2 saved with
safetensors, about 60 MB.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from xffl_airflow.transfer import RemoteFacility, TransferError, pull, push

MIB = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(MIB):
            digest.update(data)
    return digest.hexdigest()


def hashes_of(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): sha256_of(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A real model folder: a tiny GPT-2 (about 60 MB of float32 safetensors), its config files,
    a file in a subfolder and an empty one."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "global"
    config = GPT2Config(vocab_size=16384, n_embd=512, n_layer=2, n_head=8, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(folder)
    (folder / "metrics").mkdir()
    (folder / "metrics" / "round.json").write_text(json.dumps({"round": 3, "loss": 2.5}))
    (folder / "metrics" / "notes.txt").touch()
    assert (folder / "model.safetensors").stat().st_size > 50 * MIB
    return folder


@dataclass
class Site:
    """A facility of the test bed, its ``RemoteFacility``, and a fresh folder name in its workdir."""

    bed: object
    remote: RemoteFacility
    name: str

    @property
    def folder(self) -> Path:
        return Path(self.remote.workdir) / self.name

    def chown(self, path: Path) -> None:
        user = pwd.getpwnam(self.bed.user)
        os.chown(path, user.pw_uid, user.pw_gid)

    def make_folder(self, relative: str = "") -> Path:
        """A folder under the test's folder, made as the facility user would have made it."""
        path = self.folder
        for part in ["", *Path(relative).parts]:
            path = path / part
            if not path.exists():
                path.mkdir()
                self.chown(path)
        return path


def sshd_running(bed) -> bool:
    return Path(f"/proc/{bed.daemon_pid('sshd')}").exists()


@pytest.fixture
def site(testbed, monkeypatch):
    bed = testbed.facility("site1")
    monkeypatch.setenv(f"AIRFLOW_CONN_{bed.conn_id.upper()}", json.dumps(bed.connection))
    here = Site(
        bed,
        RemoteFacility(name=bed.name, conn_id=bed.conn_id, workdir=bed.workdir),
        f"t-{uuid.uuid4().hex[:8]}",
    )
    yield here
    if not sshd_running(bed):  # a test that stops sshd failed before starting it again
        bed.start_sshd()
    if here.folder.exists():
        subprocess.run(["chmod", "-R", "u+rwX", str(here.folder)], check=False)
        shutil.rmtree(here.folder, ignore_errors=True)


class FinalPathWatcher(threading.Thread):
    """Looks at a file's final path every few milliseconds while a transfer runs; records
    every time it held anything but the complete file."""

    def __init__(self, path: Path, expected_size: int, expected_sha256: str):
        super().__init__(daemon=True)
        self.path, self.size, self.sha256 = path, expected_size, expected_sha256
        self.stop = threading.Event()
        self.partial: list[str] = []
        self.checked: set[int] = set()
        self.looks = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.looks += 1
            try:
                info = self.path.stat()
            except FileNotFoundError:
                time.sleep(0.002)
                continue
            if info.st_size != self.size:
                self.partial.append(f"{info.st_size} bytes")
            elif info.st_ino not in self.checked:
                self.checked.add(info.st_ino)
                if sha256_of(self.path) != self.sha256:
                    self.partial.append("complete size, wrong content")
            time.sleep(0.002)


def when_size_reaches(path: Path, nbytes: int, action, *, timeout: float = 60) -> threading.Thread:
    """Runs ``action()`` in a thread once ``path`` holds at least ``nbytes``."""

    def wait_then_act():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if path.stat().st_size >= nbytes:
                    action()
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.002)

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# ---------------------------------------------------------------------------------------------


def test_a_model_folder_makes_the_round_trip_with_identical_hashes(site, model_dir, tmp_path):
    from safetensors.torch import load_file

    local = hashes_of(model_dir)
    sent = push(model_dir, site.remote, f"{site.name}/global")
    assert sent.files == local
    assert (sent.bytes_total, sent.bytes_sent, sent.files_skipped) == (
        sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file()),
        sent.bytes_total,
        0,
    )
    remote = site.bed.ssh(
        f"cd {site.folder}/global && sha256sum config.json generation_config.json model.safetensors metrics/*"
    )
    assert {line.split()[1]: line.split()[0] for line in remote.stdout.splitlines()} == local
    assert json.loads(json.dumps(sent.to_dict())) == sent.to_dict()

    back = tmp_path / "back"
    fetched = pull(site.remote, f"{site.name}/global", back)
    assert fetched.files == local == hashes_of(back)
    assert fetched.direction == "pull" and fetched.bytes_sent == fetched.bytes_total
    original, copy = (
        load_file(model_dir / "model.safetensors"),
        load_file(back / "model.safetensors"),
    )
    assert original.keys() == copy.keys() and all((original[k] == copy[k]).all() for k in original)
    assert not [p for p in [*back.rglob("*xffl-part"), *site.folder.rglob("*xffl-part")]]

    again = push(model_dir, site.remote, f"{site.folder}/global")  # absolute inside the workdir
    assert (again.files_skipped, again.bytes_sent, again.bytes_skipped) == (5, 0, again.bytes_total)
    assert again.files == local
    again_back = pull(site.remote, f"{site.name}/global", back)
    assert (again_back.files_skipped, again_back.bytes_sent) == (5, 0)


def test_other_tuning_moves_the_same_bytes(site, model_dir, tmp_path):
    plain = {"gather_writes": False, "channels": 1, "ciphers": ["chacha20-poly1305@openssh.com"]}
    pushed = push(
        model_dir, site.remote, f"{site.name}/plain", max_requests=4, block_size=65536, **plain
    )
    fetched = pull(site.remote, f"{site.name}/plain", tmp_path / "plain", max_files=1, **plain)
    assert pushed.files == fetched.files == hashes_of(model_dir) == hashes_of(tmp_path / "plain")


@pytest.mark.parametrize("gather_writes", [True, False])
def test_under_aes_gcm_the_client_sends_no_ignore_packets(site, tmp_path, monkeypatch, gather_writes):
    """asyncssh's ignore before every encrypted packet is dropped by the gathering connector
    (counted where asyncssh encrypts); connected the plain way, they are all still there."""
    import asyncssh
    from asyncssh.constants import MSG_CHANNEL_DATA, MSG_IGNORE

    sent: dict[int, int] = {}
    encrypt = asyncssh.connection.SSHConnection.send_packet

    def counting(self, pkttype, *args, **kwargs):
        if self._send_encryption is not None:
            sent[pkttype] = sent.get(pkttype, 0) + 1
        return encrypt(self, pkttype, *args, **kwargs)

    monkeypatch.setattr(asyncssh.connection.SSHConnection, "send_packet", counting)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(os.urandom(4 * MIB))
    report = push(tmp_path / "model", site.remote, f"{site.name}/m", gather_writes=gather_writes)
    assert report.bytes_sent == 4 * MIB
    assert sent[MSG_CHANNEL_DATA] >= 4 * MIB // 32768  # OpenSSH takes at most 32 KiB per packet
    if gather_writes:
        assert sent.get(MSG_IGNORE, 0) == 0, sent
    else:
        assert sent[MSG_IGNORE] >= sent[MSG_CHANNEL_DATA], sent


def test_a_facility_with_only_coreutils_still_verifies(site, tmp_path, monkeypatch):
    from xffl_airflow.transfer import commands

    # as if the facility had neither openssl nor python3: sha256sum after the last byte
    monkeypatch.setattr(commands, "parse_probe", lambda output: commands.HashTools())
    source = tmp_path / "m"
    source.mkdir()
    (source / "weights.bin").write_bytes(os.urandom(3 * MIB))
    pushed = push(source, site.remote, f"{site.name}/m")
    fetched = pull(site.remote, f"{site.name}/m", tmp_path / "back")
    assert pushed.files == fetched.files == hashes_of(source) == hashes_of(tmp_path / "back")
    part = site.make_folder("m") / ".weights.bin.xffl-part"  # an interrupted copy, resumed
    part.write_bytes((source / "weights.bin").read_bytes()[: 2 * MIB])
    site.chown(part)
    (source / "weights.bin").write_bytes(
        (source / "weights.bin").read_bytes()[: 2 * MIB] + os.urandom(MIB)
    )
    resumed = push(source, site.remote, f"{site.name}/m", segment_size=MIB // 2)
    assert resumed.bytes_resumed == 2 * MIB and resumed.files == hashes_of(source)


def test_sshd_killed_mid_push_resumes_and_never_exposes_a_partial_file(site, model_dir, tmp_path):
    source = tmp_path / "m"
    source.mkdir()
    shutil.copy(model_dir / "model.safetensors", source / "model.safetensors")
    size, digest = (
        (source / "model.safetensors").stat().st_size,
        sha256_of(source / "model.safetensors"),
    )
    final = site.folder / "m" / "model.safetensors"
    part = site.folder / "m" / ".model.safetensors.xffl-part"
    watcher = FinalPathWatcher(final, size, digest)
    watcher.start()

    def cut_the_link():
        site.bed.stop_sshd()
        time.sleep(2)
        site.bed.start_sshd()

    cutter = when_size_reaches(part, size * 4 // 10, cut_the_link)
    report = push(
        source, site.remote, f"{site.name}/m", max_mbps=15, segment_size=MIB, backoff=0.5, retries=6
    )
    cutter.join(30)
    watcher.stop.set()
    watcher.join()

    assert report.retries >= 1
    assert len(report.sent_per_attempt) >= 2
    assert report.sent_per_attempt[-1] < report.bytes_total  # the retry resumed
    assert report.bytes_resumed >= size // 4
    assert sha256_of(final) == digest == report.files["model.safetensors"]
    assert watcher.looks > 100 and watcher.partial == []
    assert not part.exists()


def test_sshd_killed_mid_pull_resumes_and_never_exposes_a_partial_file(site, model_dir, tmp_path):
    remote = site.make_folder("m")
    shutil.copy(model_dir / "model.safetensors", remote / "model.safetensors")
    site.chown(remote / "model.safetensors")
    size, digest = (
        (remote / "model.safetensors").stat().st_size,
        sha256_of(remote / "model.safetensors"),
    )
    back = tmp_path / "back"
    watcher = FinalPathWatcher(back / "model.safetensors", size, digest)
    watcher.start()

    def cut_the_link():
        site.bed.stop_sshd()
        time.sleep(2)
        site.bed.start_sshd()

    cutter = when_size_reaches(back / ".model.safetensors.xffl-part", size * 4 // 10, cut_the_link)
    report = pull(
        site.remote, f"{site.name}/m", back, max_mbps=15, segment_size=MIB, backoff=0.5, retries=6
    )
    cutter.join(30)
    watcher.stop.set()
    watcher.join()

    assert report.retries >= 1 and len(report.sent_per_attempt) >= 2
    assert report.sent_per_attempt[-1] < report.bytes_total
    assert report.bytes_resumed >= size // 4
    assert sha256_of(back / "model.safetensors") == digest
    assert watcher.looks > 100 and watcher.partial == []


def test_a_corrupted_remote_copy_is_detected_and_sent_again(site, model_dir):
    push(model_dir, site.remote, f"{site.name}/global")
    flip_byte(site.folder / "global" / "model.safetensors", 12345678)  # same size, other content
    report = push(model_dir, site.remote, f"{site.name}/global")
    assert report.files_skipped == 4  # all but the corrupted one
    assert report.bytes_sent == (model_dir / "model.safetensors").stat().st_size
    assert sha256_of(site.folder / "global" / "model.safetensors") == sha256_of(
        model_dir / "model.safetensors"
    )


def test_a_resumed_copy_keeps_only_the_prefix_that_hashes_alike(site, model_dir):
    source = model_dir / "model.safetensors"
    folder = site.make_folder("global")
    part = folder / ".model.safetensors.xffl-part"
    with open(source, "rb") as f:
        part.write_bytes(f.read(20 * MIB))  # an interrupted copy...
    site.chown(part)
    flip_byte(part, 5 * MIB + 10)  # ...damaged in its sixth MiB
    report = push(model_dir, site.remote, f"{site.name}/global", segment_size=MIB)
    assert report.bytes_resumed == 5 * MIB
    assert report.bytes_sent == report.bytes_total - 5 * MIB
    assert sha256_of(folder / "model.safetensors") == sha256_of(source)


def test_corruption_during_the_transfer_is_retried_and_then_refused(
    site, model_dir, tmp_path, caplog
):
    source = tmp_path / "m"
    source.mkdir()
    with open(model_dir / "model.safetensors", "rb") as f:
        (source / "weights.bin").write_bytes(f.read(24 * MIB))
    part = site.folder / "m" / ".weights.bin.xffl-part"

    # The damage lands at the start of the copy once 1 MiB is there; the facility's hasher
    # reads that start only once 16 MiB are acknowledged, over a second later at 12 MB/s.
    def damage_once():
        with open(part, "r+b") as f:
            f.write(b"\0garbage\0" * 100)

    # once: the copy is found wrong, sent again from its verified prefix, and then right
    when_size_reaches(part, MIB, damage_once)
    report = push(source, site.remote, f"{site.name}/m", max_mbps=12, segment_size=MIB)
    assert report.retries == 1
    assert "arrived with sha256" in caplog.text
    assert sha256_of(site.folder / "m" / "weights.bin") == sha256_of(source / "weights.bin")

    # every time: after the retries, an error naming the facility and the file, nothing in place
    (source / "weights.bin").write_bytes(os.urandom(24 * MIB))
    stop = threading.Event()

    def keep_damaging():
        while not stop.is_set():
            try:
                if part.stat().st_size >= MIB:
                    damage_once()
            except FileNotFoundError:
                pass
            time.sleep(0.002)

    damager = threading.Thread(target=keep_damaging, daemon=True)
    damager.start()
    try:
        with pytest.raises(
            TransferError,
            match=r"facility site1: .*/m/weights.bin: the copy still hashes differently after 2 tries",
        ) as caught:
            push(source, site.remote, f"{site.name}/m", max_mbps=12, segment_size=MIB, retries=1)
    finally:
        stop.set()
        damager.join()
    assert caught.value.path == f"{site.folder}/m/weights.bin"
    assert (
        sha256_of(site.folder / "m" / "weights.bin") == report.files["weights.bin"]
    )  # the old one stays
    assert not part.exists()


@pytest.fixture
def outside():
    """A folder outside every workdir that the facility user could write to."""
    folder = Path(tempfile.mkdtemp(prefix="xffl-outside.", dir="/tmp"))
    folder.chmod(0o777)
    (folder / "victim").write_text("untouched")
    (folder / "victim").chmod(0o666)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_paths_that_escape_the_workdir_are_refused(site, model_dir, tmp_path, outside):
    with pytest.raises(TransferError, match="contains '..'"):
        push(model_dir, site.remote, f"{site.name}/../../etc")
    with pytest.raises(TransferError, match="outside the facility's workdir"):
        push(model_dir, site.remote, str(outside))
    with pytest.raises(TransferError, match="outside the facility's workdir"):
        pull(site.remote, "/etc", tmp_path / "etc")

    folder = site.make_folder()
    (folder / "escape").symlink_to(outside)
    with pytest.raises(
        TransferError,
        match=r"escape resolves to /tmp/xffl-outside\..*, outside the workdir .*: refused",
    ):
        push(model_dir, site.remote, f"{site.name}/escape/model")
    with pytest.raises(TransferError, match="outside the workdir"):
        pull(site.remote, f"{site.name}/escape", tmp_path / "back")
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]

    leaky = site.make_folder("leaky")
    (leaky / "config.json").write_text("{}")
    (leaky / "secret").symlink_to(outside / "victim")
    with pytest.raises(
        TransferError, match=r"leaky/secret resolves to .*victim, outside the workdir"
    ):
        pull(site.remote, f"{site.name}/leaky", tmp_path / "leaky")

    # a symlink planted under the temporary name is replaced, never written through
    trap = site.make_folder("trap")
    (trap / ".config.json.xffl-part").symlink_to(outside / "victim")
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text('{"fine": true}')
    push(small, site.remote, f"{site.name}/trap")
    assert (outside / "victim").read_text() == "untouched"
    assert (trap / "config.json").read_text() == '{"fine": true}'


def test_a_host_key_mismatch_is_refused(site, testbed, model_dir, monkeypatch):
    other = testbed.facility("site2")
    wrong = {
        **site.bed.connection,
        "extra": {**site.bed.connection["extra"], "host_key": other.host_key},
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{site.bed.conn_id.upper()}", json.dumps(wrong))
    with pytest.raises(
        TransferError, match="facility site1: .*does not match the pinned key"
    ) as caught:
        push(model_dir, site.remote, f"{site.name}/global")
    assert caught.value.retryable is False
    assert not site.folder.exists()


@pytest.fixture
def small_disk(site):
    """A 2 MiB tmpfs mounted in the facility's workdir, owned by the facility user."""
    mount = site.make_folder("small")
    user = pwd.getpwnam(site.bed.user)
    subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size=2m,mode=0755,uid={user.pw_uid},gid={user.pw_gid}",
            "tmpfs",
            str(mount),
        ],
        check=True,
    )
    try:
        yield mount
    finally:
        # the facility's sftp-server or a hash command of the failed transfer may still be
        # ending when the test does: wait for the mount to be free, then detach it
        for _ in range(40):
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                break
            time.sleep(0.25)
        else:
            subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_full_remote_disk_is_named_and_leaves_nothing(site, small_disk, tmp_path):
    too_big = tmp_path / "big"
    too_big.mkdir()
    (too_big / "weights.bin").write_bytes(os.urandom(3 * MIB))
    with pytest.raises(
        TransferError,
        match=r"facility site1: not enough space at .*/small/m: \d+ bytes to write, \d+ free",
    ):
        push(too_big, site.remote, f"{site.name}/small/m")
    assert not (small_disk / "m" / "weights.bin").exists()

    # the disk fills up while the file is being written
    fits = tmp_path / "fits"
    fits.mkdir()
    (fits / "weights.bin").write_bytes(os.urandom(3 * MIB // 2))
    filler = small_disk / "filler"

    def fill_the_disk():
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}", "bs=64k", "count=32"],
            capture_output=True,
            check=False,
        )

    when_size_reaches(small_disk / "m" / ".weights.bin.xffl-part", 256 * 1024, fill_the_disk)
    with pytest.raises(
        TransferError,
        match=r"writing .*/small/m/.weights.bin.xffl-part failed .*disk full or over quota",
    ) as caught:
        push(fits, site.remote, f"{site.name}/small/m", max_mbps=1)
    assert caught.value.path == f"{small_disk}/m/weights.bin"
    assert sorted(p.name for p in (small_disk / "m").iterdir()) == []


def test_permission_errors_name_the_path(site, model_dir, tmp_path):
    locked = site.make_folder("locked")
    locked.chmod(0o555)
    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(model_dir / "config.json", config / "config.json")
    with pytest.raises(
        TransferError,
        match=r"facility site1: cannot write .*/locked/.config.json.xffl-part: permission denied",
    ):
        push(config, site.remote, f"{site.name}/locked")
    with pytest.raises(
        TransferError,
        match=r"facility site1: cannot create folder .*/locked/metrics: permission denied",
    ):
        push(model_dir, site.remote, f"{site.name}/locked")
    assert list(locked.iterdir()) == []

    unreadable = site.make_folder("unreadable")
    (unreadable / "weights.bin").write_bytes(b"secret")
    site.chown(unreadable / "weights.bin")
    (unreadable / "weights.bin").chmod(0)
    with pytest.raises(
        TransferError,
        match=r"cannot (read|hash) .*/unreadable/weights.bin.*: permission denied|Permission denied",
    ):
        pull(site.remote, f"{site.name}/unreadable", tmp_path / "back")
    assert not (tmp_path / "back" / "weights.bin").exists()


def test_a_vanished_source_file_is_named(site, tmp_path):
    source = tmp_path / "m"
    source.mkdir()
    (source / "a.bin").write_bytes(os.urandom(8 * MIB))
    (source / "b.bin").write_bytes(os.urandom(MIB))
    when_size_reaches(site.folder / "m" / ".a.bin.xffl-part", 2 * MIB, (source / "b.bin").unlink)
    with pytest.raises(TransferError, match=r"local file .*/m/b.bin vanished before it was sent"):
        push(source, site.remote, f"{site.name}/m", max_files=1, max_mbps=8)
    assert not (site.folder / "m" / "b.bin").exists()

    remote = site.make_folder("r")
    for name, size in (("a.bin", 8 * MIB), ("b.bin", MIB)):
        (remote / name).write_bytes(os.urandom(size))
        site.chown(remote / name)
    back = tmp_path / "back"
    when_size_reaches(back / ".a.bin.xffl-part", 2 * MIB, (remote / "b.bin").unlink)
    with pytest.raises(TransferError, match=r"cannot (read|hash) .*/r/b.bin: no such file"):
        pull(site.remote, f"{site.name}/r", back, max_files=1, max_mbps=8)
    assert not (back / "b.bin").exists()


def test_a_pull_budget_takes_the_trained_model_and_refuses_more_before_writing(
    site, model_dir, tmp_path
):
    """A facility's folder that holds what was pushed comes back within its budget; one that
    adds an 81 GB file (sparse: its listing announces it) or thousands of files is refused
    before anything is written here, naming the facility, the file and the limit."""
    from xffl_airflow.transfer import PullBudget, PullRefused

    budget = PullBudget.for_model(model_dir, adapter=False)
    push(model_dir, site.remote, f"{site.name}/local")
    metrics = site.folder / "local" / "metrics.json"
    metrics.write_text(json.dumps({"num_samples": 10}))
    site.chown(metrics)
    back = tmp_path / "back"
    fetched = pull(site.remote, f"{site.name}/local", back, budget=budget)
    assert fetched.files == hashes_of(back) and "metrics.json" in fetched.files

    with open(site.folder / "local" / "model.safetensors", "r+b") as f:
        f.truncate(81 * 10**9)  # sparse: costs the facility no disk
    refused_dir = tmp_path / "refused"
    with pytest.raises(PullRefused) as refused:
        pull(site.remote, f"{site.name}/local", refused_dir, budget=budget)
    limit = (model_dir / "model.safetensors").stat().st_size + 4 * MIB
    assert str(refused.value) == (
        f"facility {site.bed.name}: pull refused before writing anything: file "
        f"'model.safetensors' announces {81 * 10**9} bytes, more than the {limit} allowed for it "
        "(model weights)"
    )
    assert not refused_dir.exists()

    many = site.make_folder("many")
    for i in range(2000):
        (many / f"shard-{i:05d}.bin").touch()
    subprocess.run(["chown", "-R", f"{site.bed.user}:", str(many)], check=True)
    with pytest.raises(PullRefused, match=r"holds more than the \d+ files the pull allows"):
        pull(site.remote, f"{site.name}/many", refused_dir, budget=budget)
    assert not refused_dir.exists()
