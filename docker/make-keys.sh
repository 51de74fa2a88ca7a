#!/usr/bin/env bash
# make-keys.sh [--out DIR] [--force] [NAME...]
#
# Makes, once, the keys and secrets of the compose deployment (nothing of it is committed):
#   DIR/NAME/ssh_host_ed25519_key(.pub)  the facility's SSH host key, mounted into its container
#   DIR/NAME/client_key(.pub)            the key Airflow logs in with; .pub is the facility
#                                        user's only authorized key
#   DIR/airflow.env     for every Airflow service: AIRFLOW_CONN_FACILITY_<NAME> (an SSH
#                       connection to host NAME, port 22, user xffl, private key inline, host key
#                       pinned, host-key checking on)
#   compose secrets (mounted under /run/secrets/; one value each, without a final newline, as
#   Airflow's AIRFLOW__...__KEY_CMD="cat FILE" reads them whole):
#   DIR/postgres_password       the PostgreSQL password (POSTGRES_PASSWORD_FILE)
#   DIR/sql_alchemy_conn        the metadata database URL (with that password)
#   DIR/celery_result_backend   the Celery result backend URL (the same database)
#   DIR/redis.conf              Redis' config: its password (requirepass), for the broker
#   DIR/celery_broker_url       the broker URL (with that password)
#   DIR/fernet_key, DIR/jwt_secret, DIR/api_secret_key   Airflow's Fernet key, JWT secret and
#                       [api] secret_key (log server requests), the same for every component
#   DIR/passwords.json  the UI login (user admin) of Airflow's simple auth manager (a bind mount,
#                       not a secret: the auth manager opens it for writing)
#   DIR/../.env         AIRFLOW_UID, so that the Airflow and Redis containers run as you and
#                       can read the files above (written 0600); compose reads .env beside
#                       compose.yaml and refuses to start without it
# No password has a default anywhere: each is made here, at random, once.
# NAME defaults to the facilities of compose.yaml: site1 site2. DIR defaults to keys/ beside
# this script. Refuses to overwrite existing keys unless --force (the connections pin them).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

FACILITY_USER=xffl
SSH_PORT=22
DB_HOST=postgres
DB_PORT=5432
DB_NAME=airflow
DB_USER=airflow
UI_USER=admin
REDIS_HOST=redis
REDIS_PORT=6379

die() { echo "make-keys: error: $*" >&2; exit 1; }
usage() { echo "usage: make-keys.sh [--out DIR] [--force] [NAME...]" >&2; exit 2; }

out=$here/keys force=0 names=()
while [ $# -gt 0 ]; do
    case "$1" in
        --out) [ $# -ge 2 ] || usage; out=$2; shift 2 ;;
        --force) force=1; shift ;;
        -*) usage ;;
        *) names+=("$1"); shift ;;
    esac
done
[ ${#names[@]} -gt 0 ] || names=(site1 site2)
for name in "${names[@]}"; do
    [[ "$name" =~ ^[a-z][a-z0-9_]{0,15}$ ]] || die "bad facility name '$name': use 1-16 of a-z, 0-9, _ (starting with a letter)"
done
command -v ssh-keygen >/dev/null || die "ssh-keygen not found (Debian: apt-get install openssh-client)"
if [ -e "$out/airflow.env" ] && [ "$force" -ne 1 ]; then
    die "$out/airflow.env exists: the keys are made once (pass --force to make new ones and re-pin them)"
fi

umask 077
mkdir -p "$out"
tmp=$(mktemp -d "$out/.make-keys.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

secret() { od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'; }
# A Fernet key: 32 random bytes, URL-safe base64.
fernet_key() { head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '\n'; }
# A file's text as the inside of a JSON string (keys and base64 need no more than \n).
json_text() { awk '{ printf "%s\\n", $0 }' "$1"; }

db_password=$(secret 16)
redis_password=$(secret 24)
{
    echo "# Made by docker/make-keys.sh: secrets, keep private (0600)."
    for name in "${names[@]}"; do
        mkdir -p "$tmp/$name"
        ssh-keygen -q -t ed25519 -N '' -C "$name-host" -f "$tmp/$name/ssh_host_ed25519_key"
        ssh-keygen -q -t ed25519 -N '' -C "airflow-to-$name" -f "$tmp/$name/client_key"
        host_key=$(cut -d' ' -f1,2 "$tmp/$name/ssh_host_ed25519_key.pub")
        conn_name=$(echo "facility_$name" | tr '[:lower:]' '[:upper:]')
        printf "AIRFLOW_CONN_%s='%s'\n" "$conn_name" \
            "{\"conn_type\": \"ssh\", \"host\": \"$name\", \"port\": $SSH_PORT, \"login\": \"$FACILITY_USER\", \"extra\": {\"private_key\": \"$(json_text "$tmp/$name/client_key")\", \"host_key\": \"$host_key\", \"no_host_key_check\": false, \"conn_timeout\": 10}}"
    done
} >"$tmp/airflow.env"
# One value per file, no final newline (Airflow's _CMD options take the output as it is).
printf '%s' "$db_password" >"$tmp/postgres_password"
printf '%s' "postgresql+psycopg2://$DB_USER:$db_password@$DB_HOST:$DB_PORT/$DB_NAME" >"$tmp/sql_alchemy_conn"
printf '%s' "db+postgresql://$DB_USER:$db_password@$DB_HOST:$DB_PORT/$DB_NAME" >"$tmp/celery_result_backend"
printf '%s' "redis://:$redis_password@$REDIS_HOST:$REDIS_PORT/0" >"$tmp/celery_broker_url"
{
    echo "# Made by docker/make-keys.sh: Redis' config, read by redis-server as a compose secret."
    echo "requirepass $redis_password"
    echo "bind * -::*"
    echo "protected-mode yes"
    echo "dir /tmp"
} >"$tmp/redis.conf"
printf '%s' "$(fernet_key)" >"$tmp/fernet_key"
printf '%s' "$(secret 32)" >"$tmp/jwt_secret"
printf '%s' "$(secret 32)" >"$tmp/api_secret_key"
ui_password=$(secret 12)
printf '{"%s": "%s"}\n' "$UI_USER" "$ui_password" >"$tmp/passwords.json"

# Everything appears complete, or not at all.
for name in "${names[@]}"; do
    rm -rf "${out:?}/$name"
    mv "$tmp/$name" "$out/$name"
done
SECRETS="postgres_password sql_alchemy_conn celery_result_backend celery_broker_url redis.conf fernet_key jwt_secret api_secret_key passwords.json"
for file in $SECRETS airflow.env; do  # airflow.env last: its presence means "made"
    mv "$tmp/$file" "$out/$file"
done
project=$(cd "$out/.." && pwd)
printf 'AIRFLOW_UID=%s\n' "$(id -u)" >"$project/.env.tmp"
mv "$project/.env.tmp" "$project/.env"
echo "make-keys: wrote $out (facilities: ${names[*]}; UI login $UI_USER, password in $out/passwords.json)"
for name in "${names[@]}"; do
    echo "  $name host key: $(ssh-keygen -l -f "$out/$name/ssh_host_ed25519_key.pub")"
done
