#!/usr/bin/env bash
# entrypoint.sh: runs one facility in the foreground (the facility image's entrypoint).
#
# Starts munged, slurmctld, slurmd and sshd through the very functions of lib.sh that the local
# test bed (`up`) uses: start_munge, create_user, start_facility. It lays its run directory out
# as `up` does (token, users, pids/, NAME/facility.env), so that `down` stops it: on SIGTERM or
# SIGINT it runs `down`, and when one daemon dies it stops the others and exits 1 (the
# container's restart policy then starts it again; the Slurm state and the home persist).
#
# Environment (defaults are the image's):
#   FACILITY_NAME    required: [a-z][a-z0-9_]{0,15}; also the Slurm ClusterName
#   FACILITY_USER    xffl                     the login of the Airflow side
#   FACILITY_HOME    /home/$FACILITY_USER     its home; the federation's workdir lives inside
#   FACILITY_KEYS    /etc/xffl/keys           from docker/make-keys.sh: client_key.pub (the only
#                                             authorized key) and ssh_host_ed25519_key (the host
#                                             key the Airflow connection pins)
#   XFFL_RUN_DIR     /var/lib/xffl-facility   Slurm state, logs, sshd config, PIDs
#   SSH_PORT 22, SSH_LISTEN 0.0.0.0, SLURMCTLD_PORT 6817, SLURMD_PORT 6818,
#   MIN_JOB_AGE 300, PARTITION debug, NODE_CPUS (all cores)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=lib.sh
. "$here/lib.sh"

: "${FACILITY_NAME:?set FACILITY_NAME to the facility name}"
facility_check_name "$FACILITY_NAME"
FACILITY_USER=${FACILITY_USER:-xffl}
FACILITY_HOME=${FACILITY_HOME:-/home/$FACILITY_USER}
FACILITY_KEYS=${FACILITY_KEYS:-/etc/xffl/keys}
XFFL_RUN_DIR=${XFFL_RUN_DIR:-/var/lib/xffl-facility}
SSH_PORT=${SSH_PORT:-22}
SSH_LISTEN=${SSH_LISTEN:-0.0.0.0}
SLURMCTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
MIN_JOB_AGE=${MIN_JOB_AGE:-300}
PARTITION=${PARTITION:-debug}
[ "$(id -u)" -eq 0 ] || facility_die "the facility entrypoint needs root (it creates the user and starts Slurm)"
for key in client_key.pub ssh_host_ed25519_key; do
    [ -s "$FACILITY_KEYS/$key" ] || facility_die "no $FACILITY_KEYS/$key: run docker/make-keys.sh and mount keys/$FACILITY_NAME there"
done

run_dir=$XFFL_RUN_DIR
mkdir -p "$run_dir/pids"
chmod 755 "$run_dir"
[ -s "$run_dir/token" ] || od -An -N3 -tx1 /dev/urandom | tr -d ' \n' >"$run_dir/token"
echo "$FACILITY_USER" >"$run_dir/users"
echo starting >"$run_dir/state"

stopping=0
stop_facility() {  # stop_facility EXIT_STATUS
    [ "$stopping" -eq 0 ] || return 0
    stopping=1
    facility_log "stopping $FACILITY_NAME"
    "$here/down" "$run_dir" >&2 || true
    exit "$1"
}
trap 'stop_facility 0' TERM INT
trap 'stop_facility $?' EXIT

start_munge "$run_dir/munge"
cp "$run_dir/munge/munged.pid" "$run_dir/pids/munged.pid"

create_user "$FACILITY_USER" "$FACILITY_HOME" "$FACILITY_KEYS/client_key.pub"
runuser -u "$FACILITY_USER" -- mkdir -p "$FACILITY_HOME/xffl"

FACILITY_DIR=$run_dir/$FACILITY_NAME
mkdir -p "$FACILITY_DIR"
# The pinned host key, not one made here: start_facility keeps a key it finds in place.
install -m 600 "$FACILITY_KEYS/ssh_host_ed25519_key" "$FACILITY_DIR/ssh_host_ed25519_key"
cat >"$FACILITY_DIR/facility.env" <<EOF
FACILITY_NAME=$FACILITY_NAME
FACILITY_DIR=$FACILITY_DIR
FACILITY_USER=$FACILITY_USER
SLURMCTLD_PORT=$SLURMCTLD_PORT
SLURMD_PORT=$SLURMD_PORT
SSH_PORT=$SSH_PORT
SSH_LISTEN=$SSH_LISTEN
MUNGE_SOCKET=$run_dir/munge/munge.socket
MIN_JOB_AGE=$MIN_JOB_AGE
PARTITION=$PARTITION
EOF
set -a
# shellcheck disable=SC1091
. "$FACILITY_DIR/facility.env"
set +a
start_facility
echo up >"$run_dir/state"

# In the foreground while every daemon lives; `wait` on a sleep lets the traps run at once.
while :; do
    for pidfile in "$run_dir/pids/munged.pid" "$FACILITY_DIR"/pids/{slurmctld,slurmd,sshd}.pid; do
        if ! pid_alive "$pidfile"; then
            facility_log "$(basename "$pidfile" .pid) of $FACILITY_NAME ended"
            stop_facility 1
        fi
    done
    sleep 5 &
    wait $! || true
done
