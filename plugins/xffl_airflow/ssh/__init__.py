"""Opening asyncssh connections to a facility from its Airflow SSH connection.

The Slurm hook, the trigger and the SFTP transfer all reach a facility through here, so there
is one place where host keys are checked: from the connection's ``host_key`` extra (pinned),
its ``known_hosts`` extra (a file), or the user's ``~/.ssh/known_hosts``. A connection that
asks to skip the check (``no_host_key_check``) is refused. Secrets stay in the Airflow
connection: the key comes from ``private_key`` or ``key_file``, or the password field.

Access as centres grant it:

- ``certificate`` (the OpenSSH user certificate's text) or ``certificate_file`` (its path)
  pairs the key with a certificate signed by the site's CA. It is read again on every connect,
  so renewing the file (or the connection) mends an expired certificate without a restart. An
  expired or not-yet-valid certificate is a *retryable* error naming its validity: a campaign
  outlives a 12 h certificate, and a job is never read as failed because of it.
- ``jump_host`` names the Airflow SSH connection of a bastion (or a list of them, outermost
  first, at most ``MAX_JUMP_HOSTS``): each hop is a connection of its own, its host key pinned
  and checked like the facility's, and closing the facility's connection closes the hops.
"""

from xffl_airflow.ssh.certificates import (
    CERT_CLOCK_SKEW,
    certificate_problem,
    certificate_validity,
    load_certificate,
)
from xffl_airflow.ssh.connect import connect, connect_options
from xffl_airflow.ssh.target import (
    DEFAULT_PORT,
    MAX_JUMP_HOSTS,
    FacilityConnectionError,
    SSHTarget,
    aget_target,
    check_hop,
    get_target,
    known_hosts_line,
    parse_jump_hosts,
    target_from_connection,
)

__all__ = [
    "CERT_CLOCK_SKEW", "DEFAULT_PORT", "MAX_JUMP_HOSTS", "FacilityConnectionError", "SSHTarget", "aget_target",
    "certificate_problem", "certificate_validity", "check_hop", "connect", "connect_options", "get_target",
    "known_hosts_line", "load_certificate", "parse_jump_hosts", "target_from_connection",
]  # fmt: skip
