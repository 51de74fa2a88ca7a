"""OpenSSH user certificates: read on every connect, their validity named when they fail."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import asyncssh

from xffl_airflow.ssh.target import FacilityConnectionError, SSHTarget

# A login refused this close to the certificate's end (the site's clock runs ahead of ours) is
# read as the certificate having expired: retried, not refused.
CERT_CLOCK_SKEW = 300.0


def _utc(seconds: float) -> str:
    try:
        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):  # ssh-keygen's "forever" (2**64 - 1)
        return "forever" if seconds > 0 else "always"


def certificate_validity(cert: Any) -> tuple[int, int]:
    """(valid_after, valid_before) of an OpenSSH certificate, in seconds since the epoch.

    asyncssh decodes both but keeps them private (``SSHOpenSSHCertificate.validate`` reads them).
    """
    return int(cert._valid_after), int(cert._valid_before)


def certificate_source(target: SSHTarget) -> str:
    return f"certificate_file {target.certificate_file}" if target.certificate_file else "certificate extra"


def load_certificate(target: SSHTarget) -> Any:
    """Reads the target's certificate now (never cached): the text, or the file as it is now."""
    source = certificate_source(target)
    if target.certificate_file:
        try:
            with open(target.certificate_file, "rb") as f:
                data: bytes | str = f.read()
        except OSError as error:  # a renewal may be replacing it: asked again later
            raise FacilityConnectionError(
                target.conn_id, f"cannot read {source}: {error.strerror or type(error).__name__}", retryable=True
            ) from None
    else:
        data = str(target.certificate)
    try:
        cert = asyncssh.import_certificate(data)
    except (asyncssh.KeyImportError, ValueError) as error:
        raise FacilityConnectionError(target.conn_id, f"{source} is not an OpenSSH certificate ({error})") from None
    if not isinstance(cert, asyncssh.public_key.SSHOpenSSHCertificate):
        raise FacilityConnectionError(target.conn_id, f"{source} is an X.509 certificate; an OpenSSH one is needed")
    if cert._cert_type != asyncssh.public_key.CERT_TYPE_USER:
        raise FacilityConnectionError(target.conn_id, f"{source} is a host certificate; a user certificate is needed")
    return cert


def certificate_problem(target: SSHTarget, cert: Any, now: float | None = None, *, skew: float = 0.0) -> str | None:
    """Why ``cert`` cannot log in at ``now`` (expired, not yet valid), naming its validity; None if valid.

    ``skew``: seconds by which the site's clock may run ahead of ours.
    """
    now = time.time() if now is None else now
    after, before = certificate_validity(cert)
    window = f"valid from {_utc(after)} to {_utc(before)}"
    if now + skew >= before:
        return (
            f"the SSH certificate ({certificate_source(target)}) expired at {_utc(before)} ({window}); "
            "renew it (the file or the connection) and the connection is tried again"
        )
    if now < after:
        return (
            f"the SSH certificate ({certificate_source(target)}) is not valid before {_utc(after)} ({window}); "
            "check this machine's clock or the certificate"
        )
    return None
