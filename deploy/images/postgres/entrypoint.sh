#!/bin/sh
# Entrypoint of ferry/postgres:15. Starts as root only long enough to give the
# data directory (a fresh Ferry volume is owned by root) to the postgres user,
# then runs itself again as postgres: initialises a cluster on an empty data
# directory and runs the server in the foreground, logging to stderr (docker logs).
#
# Authentication is "trust" for every client: the image is for tests and demos,
# where containers run with --network none or on a private test network.
set -eu

PGDATA="${PGDATA:-/var/lib/postgresql/data}"
export PGDATA

if [ "$(id -u)" -eq 0 ]; then
    mkdir -p "$PGDATA" /run/postgresql
    chown postgres:postgres "$PGDATA" /run/postgresql
    chmod 0700 "$PGDATA"
    chmod 2775 /run/postgresql
    exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$0" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    echo "ferry-postgres: initialising a new cluster in $PGDATA" >&2
    initdb --pgdata="$PGDATA" --username=postgres --auth=trust \
        --encoding=UTF8 --locale=C.UTF-8 >&2
    {
        echo "listen_addresses = '*'"
        echo "unix_socket_directories = '/run/postgresql'"
        echo "logging_collector = off"
        echo "log_destination = 'stderr'"
        echo "jit = off"
    } >>"$PGDATA/postgresql.conf"
    echo "host all all all trust" >>"$PGDATA/pg_hba.conf"
fi

if [ "$#" -gt 0 ] && [ "$1" != "postgres" ]; then
    exec "$@"
fi
[ "$#" -gt 0 ] && shift

# docker stop sends SIGTERM, which PostgreSQL reads as "smart" shutdown: wait
# for every client to leave, so a connected writer would hold it until Docker
# kills it. Import cannot set STOPSIGNAL, so this shell stays as PID 1 and
# turns SIGTERM into SIGINT, PostgreSQL's "fast" shutdown (clean, no recovery).
postgres -D "$PGDATA" "$@" &
server=$!
trap 'kill -INT "$server" 2>/dev/null' TERM INT
status=0
wait "$server" || status=$?
while kill -0 "$server" 2>/dev/null; do
    status=0
    wait "$server" || status=$?
done
exit "$status"
