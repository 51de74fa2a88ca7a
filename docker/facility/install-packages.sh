#!/usr/bin/env bash
# Installs the system packages a local facility needs (Slurm, munge, sshd), only when one is
# missing. Used by `make` on a developer's machine and in CI, and by docker/facility/Dockerfile.
# Idempotent: does nothing when every command is already there. As root it installs them with
# apt-get; otherwise it names what to install and exits 1.
set -euo pipefail

# command -> Debian package that provides it
declare -A NEEDED=(
    [slurmctld]=slurmctld
    [slurmd]=slurmd
    [sbatch]=slurm-client
    [munged]=munge
    [sshd]=openssh-server
    [ssh-keygen]=openssh-client
    [sftp]=openssh-client
    [openssl]=openssl   # fast sha256 of transferred files (coreutils sha256sum is far slower)
)
# Packages checked by name: the facility-side Python (Debian's, readable by the facility users).
EXTRA_PACKAGES="python3 python3-venv ${XFFL_EXTRA_SYSTEM_PACKAGES:-}"

missing=()
for cmd in "${!NEEDED[@]}"; do
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
        missing+=("${NEEDED[$cmd]}")
    fi
done
for pkg in $EXTRA_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
# unique, stable order
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

if [ "$(id -u)" -ne 0 ]; then
    echo "xffl-airflow: the local facilities need these system packages: ${missing[*]}" >&2
    echo "  install them as root, for example:" >&2
    echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
fi

echo "xffl-airflow: installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "xffl-airflow: system packages installed"
