# shellcheck shell=bash
# One line per step on the terminal, every command's output in a log file.
# Sourced by deploy/install.sh and deploy/demo.sh:
#
#   steps_open NAME LOG     start (appending to) LOG; NAME prefixes each line
#   step "what it does" COMMAND [ARG...]
#
# prints "NAME: what it does... done (12 s)" with COMMAND's stdout and stderr
# in LOG. On failure it prints the last lines of LOG and its path and exits
# with COMMAND's status: the operator sees why without scrolling, and where
# the rest is.

steps_open() {
    steps_name="$1"
    steps_log="$2"
    mkdir -p "$(dirname "$steps_log")"
    printf '\n=== %s %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$steps_name" >>"$steps_log"
}

step() {
    local what="$1" started=$SECONDS status
    shift
    printf '%s: %s... ' "$steps_name" "$what" >&2
    printf -- '--- %s: %s\n' "$what" "$*" >>"$steps_log"
    # A subshell with -e of its own: in an 'if' condition bash would ignore -e inside COMMAND
    # (a function), and its first failing command would not stop it.
    set +e
    (set -e; "$@") >>"$steps_log" 2>&1 </dev/null
    status=$?
    set -e
    if [ "$status" -eq 0 ]; then
        printf 'done (%d s)\n' "$((SECONDS - started))" >&2
        return 0
    fi
    printf 'FAILED (exit %d after %d s); the last lines of %s:\n' \
        "$status" "$((SECONDS - started))" "$steps_log" >&2
    tail -n 25 "$steps_log" | sed 's/^/    /' >&2
    printf '%s: %s failed; the full log is %s\n' "$steps_name" "$what" "$steps_log" >&2
    exit "$status"
}
