"""Remote commands of a transfer, framed against what the login shell prints, and the messages
that say what went wrong with them.

Real login nodes print on every shell, non-interactive ones included (a message of the day, a
quota notice, a terminal-title escape sequence; see ``xffl_airflow.remote_frame``). Every command
a transfer runs over an exec channel goes out as a ``FramedCommand``; ``read_result`` keeps only
its own output and logs the shell's, once per facility, at debug level.

SFTP cannot be framed: with OpenSSH's ``sftp-server`` subsystem (not ``internal-sftp``) sshd
starts the server through the user's shell, and whatever that shell prints on stdout lands in
the SFTP stream. ``noisy_sftp_message`` tells the user why and how to fix it.

Pure functions, tested on literal outputs in ``tests/plugins/xffl_airflow/transfer/test_remote_exec.py``.
"""

from __future__ import annotations

import logging

from xffl_airflow.remote_frame import FrameError, first_bytes, frame_command, new_nonce, unframe
from xffl_airflow.transfer.errors import RetryableFailure, TransferError

log = logging.getLogger(__name__)

QUIET_BASHRC = "[[ $- == *i* ]] || return"

_noisy_facilities: set[str] = set()


class FramedCommand:
    """``command`` framed with a fresh nonce: ``text`` is what runs on the facility."""

    def __init__(self, command: str):
        self.command = command
        self.nonce = new_nonce()
        self.text = frame_command(command, self.nonce)


def shown(command: str, limit: int = 120) -> str:
    """A command as messages show it: one line, bounded."""
    line = " ".join(command.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def note_noise(facility: str, noise: bytes) -> None:
    """Logs, once per facility and process, that its login shell prints around our commands."""
    if noise.strip() and facility not in _noisy_facilities:
        _noisy_facilities.add(facility)
        log.debug(
            "facility %s: the login shell prints around remote commands (set aside): %s",
            facility, first_bytes(noise),
        )  # fmt: skip


def timeout_message(facility: str, command: str, limit: float) -> str:
    return (
        f"the remote command `{shown(command)}` on facility {facility} did not finish "
        f"within the command_timeout of {limit:g} s"
    )


def read_result(
    facility: str,
    command: FramedCommand,
    stdout: bytes | None,
    stderr: bytes | None,
    exit_status: int | None,
    exit_signal: object = None,
    *,
    action: str,
    path: str,
    check: bool = True,
) -> str:
    """The command's own stdout, decoded; raises naming the facility, ``action`` and ``path``.

    ``RetryableFailure`` when the command ended without a status (killed with the link, sshd
    restarting); ``TransferError`` when it failed (with ``check``) or its frame is broken.
    """
    try:
        framed = unframe(stdout or b"", stderr or b"", command.nonce)
    except FrameError as error:
        if exit_status is None:
            raise RetryableFailure(
                f"{action} {path}: remote command ended without status (signal {exit_signal})"
            ) from None
        raise TransferError(
            facility,
            f"cannot {action} {path}: `{shown(command.command)}` exited {exit_status}, "
            f"and {error}; stderr: {first_bytes(stderr or b'', 300)}",
            path=path,
        ) from None
    note_noise(facility, framed.noise)
    status = framed.exit_status if framed.exit_status is not None else exit_status
    if check and status != 0:
        err = framed.stderr.decode(errors="replace").strip()[-500:]
        if status is None:
            if not err:
                raise RetryableFailure(
                    f"{action} {path}: remote command ended without status (signal {exit_signal})"
                )
            status = f"signal {exit_signal}"
        raise TransferError(facility, f"cannot {action} {path} (exit {status}): {err}", path=path)
    return framed.stdout.decode(errors="replace")


def noisy_sftp_message(stdout_noise: bytes, error: BaseException) -> str:
    """Why SFTP cannot start when the login shell prints on stdout, and what fixes it."""
    return (
        f"SFTP cannot start ({type(error).__name__}: {error}): the facility runs its SFTP server "
        "through the login shell, and that shell prints on stdout even for non-interactive "
        f"sessions, which corrupts the SFTP stream. First bytes it prints: {first_bytes(stdout_noise)}. "
        f"Fix: put `{QUIET_BASHRC}` at the top of ~/.bashrc on the facility (and keep other "
        "start-up files quiet when not interactive), or ask the site to configure the "
        "`internal-sftp` subsystem, which runs no shell. Retrying will not help"
    )
