#!/usr/bin/env bash
# Builds Ferry's managed (v2) Docker plugin from Debian packages and this
# repository, without a registry, and installs it into a Docker daemon.
#
#   deploy/docker-plugin/build.sh [--cache-dir DIR] [--docker-host URL] [--name NAME]
#       [--agent-socket-dir DIR] [--agent-mount-root DIR] [--no-install]
#
# The plugin is a forwarder (docs/deploy.md, section 6): it runs
# ferry-plugin-forward, which answers Docker's volume-plugin calls on the
# plugin socket by asking the host's ferry-agent on its own plugin socket
# (--agent-socket-dir, default /run/ferry) and bind-mounts the agent's mounts
# (--agent-mount-root, default /var/lib/ferry/mnt, mounted at the same path in
# the plugin) into the plugin's propagated mount. The agent keeps ZFS; the plugin needs no ZFS userland.
# The root filesystem (debootstrap minbase bookworm, python3, Ferry and its
# dependencies in /opt/ferry/venv) is cached as a tarball in DIR (default
# /var/cache/ferry/plugin) under a key of its inputs: the Debian suite, packages
# and mirror (the base layer), this directory and Ferry's sources. Installing
# replaces a plugin of the same NAME (default ferry/ferry:latest), then
# `docker plugin create`, `set`, `enable`.
# Environment: FERRY_DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache_dir=/var/cache/ferry/plugin
docker_host="${DOCKER_HOST:-}"
name=ferry/ferry:latest
agent_socket_dir=/run/ferry
agent_mount_root=/var/lib/ferry/mnt
install=1
mirror="${FERRY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
apt_opts=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)

usage() { sed -n '2,20p' "$0"; }
log() { printf 'docker-plugin/build.sh: %s\n' "$*" >&2; }
die() { printf 'docker-plugin/build.sh: error: %s\n' "$*" >&2; exit 1; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        --cache-dir) [ "$#" -ge 2 ] || die "--cache-dir needs a directory"; cache_dir="$2"; shift 2 ;;
        --docker-host) [ "$#" -ge 2 ] || die "--docker-host needs a URL (e.g. unix:///run/docker.sock)"; docker_host="$2"; shift 2 ;;
        --name) [ "$#" -ge 2 ] || die "--name needs a plugin name (e.g. ferry/ferry:latest)"; name="$2"; shift 2 ;;
        --agent-socket-dir) [ "$#" -ge 2 ] || die "--agent-socket-dir needs the directory of the agent's ferry.sock"; agent_socket_dir="$2"; shift 2 ;;
        --agent-mount-root) [ "$#" -ge 2 ] || die "--agent-mount-root needs the agent's --mount-root"; agent_mount_root="$2"; shift 2 ;;
        --no-install) install=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap, chroot and docker plugin create need it)"
case "$name" in *:*) ;; *) name="$name:latest" ;; esac

docker_cmd=(docker)
if [ -n "$docker_host" ]; then
    docker_cmd+=(-H "$docker_host")
fi
if [ "$install" -eq 1 ]; then
    "${docker_cmd[@]}" version --format '{{.Server.Version}}' >/dev/null 2>&1 \
        || die "no Docker daemon answers at ${docker_host:-the default socket}; start dockerd or pass --docker-host"
fi

# Two cached layers: the Debian base (debootstrap, keyed by suite, packages and mirror),
# and the root filesystem (the base plus Ferry, keyed by this directory and Ferry's sources).
base_packages=python3,python3-venv,ca-certificates
base_key="$(printf '%s\n' "$suite" "$base_packages" "$mirror" | sha256sum | cut -c1-16)"
sources_key="$(
    cd "$repo" && git ls-files -z --cached --others --exclude-standard -- \
        deploy/docker-plugin pyproject.toml agent control ferry protos \
        | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
)"
content_key="$base_key-$sources_key"
mkdir -p "$cache_dir"
base_tarball="$cache_dir/base-$base_key.tar"
tarball="$cache_dir/rootfs-$content_key.tar"
build_log="$cache_dir/build.log"

now() { date +%s%N; }
elapsed() {
    local ms=$((($(now) - $1) / 1000000))
    printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

in_root() {
    chroot "$1" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "${@:2}"
}

pack() {
    tar --numeric-owner --one-file-system -C "$1" \
        --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* -cf "$2.partial" .
    mv "$2.partial" "$2"
}

build_base() {
    local root="$1"
    command -v debootstrap >/dev/null 2>&1 || {
        log "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends debootstrap >/dev/null
    }
    log "debootstrap --variant=minbase --include=$base_packages $suite from $mirror"
    mkdir -p "$cache_dir/debs"
    debootstrap --variant=minbase --cache-dir="$cache_dir/debs" --include="$base_packages" "$suite" "$root" "$mirror" \
        >>"$build_log" 2>&1 || die "debootstrap failed; see the end of $build_log"
    rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/usr/share/locale/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
        "$root"/var/cache/apt/archives/*.deb "$root"/var/log/* "$root"/tmp/*
}

# Ferry's wheel is built from a copy of its tracked files, so nothing stale in build/ enters it.
install_ferry() {
    local root="$1" src="$1.src" wheels="$1.wheels"
    mkdir -p "$src"
    (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
        | tar --null -T - -cf -) | tar -C "$src" -xf -
    log "wheels of Ferry and its dependencies (pip wheel, this machine's package index)"
    python3 -m pip wheel --quiet --wheel-dir "$wheels" "$src" >>"$build_log" 2>&1 \
        || die "pip wheel failed; see the end of $build_log"
    mkdir -p "$root/tmp/wheels"
    cp "$wheels"/*.whl "$root/tmp/wheels/"
    log "installing Ferry in /opt/ferry/venv of the root filesystem"
    {
        in_root "$root" python3 -m venv /opt/ferry/venv \
            && in_root "$root" /opt/ferry/venv/bin/pip install --quiet --no-index --no-cache-dir \
                --find-links /tmp/wheels ferry \
            && in_root "$root" /opt/ferry/venv/bin/ferry-plugin-forward --help >/dev/null
    } >>"$build_log" 2>&1 || die "installing Ferry in the root filesystem failed; see the end of $build_log"
    rm -rf "$root"/tmp/* "$src" "$wheels"
    mkdir -p "$root/var/lib/ferry/plugin-mnt" "$root/var/lib/ferry/mnt" "$root/run/ferry-agent" "$root/run/docker/plugins"
}

cached_rootfs() {
    local started work stale lock_fd
    exec {lock_fd}>"$cache_dir/build.lock"
    flock "$lock_fd"
    if [ -s "$tarball" ]; then
        log "cached root filesystem $tarball"
        exec {lock_fd}>&-
        return 0
    fi
    started="$(now)"
    work="$(mktemp -d "$cache_dir/.build-XXXXXX")"
    # shellcheck disable=SC2064  # expand $work now
    trap "rm -rf '$work'" EXIT
    : >"$build_log"
    if [ -s "$base_tarball" ]; then
        log "cached Debian base $base_tarball"
        mkdir "$work/rootfs"
        tar -C "$work/rootfs" -xf "$base_tarball"
    else
        build_base "$work/rootfs"
        pack "$work/rootfs" "$base_tarball"
        for stale in "$cache_dir"/base-*.tar; do
            [ "$stale" = "$base_tarball" ] || rm -f "$stale"
        done
    fi
    install_ferry "$work/rootfs"
    pack "$work/rootfs" "$tarball"
    rm -rf "$work"
    trap - EXIT
    for stale in "$cache_dir"/rootfs-*.tar; do
        [ "$stale" = "$tarball" ] || rm -f "$stale"
    done
    log "built root filesystem in $(elapsed "$started")s: $tarball ($(du -h "$tarball" | cut -f1))"
    exec {lock_fd}>&-
}

install_plugin() {
    local started plugin_dir
    started="$(now)"
    plugin_dir="$(mktemp -d "$cache_dir/.plugin-XXXXXX")"
    # shellcheck disable=SC2064  # expand $plugin_dir now
    trap "rm -rf '$plugin_dir'" EXIT
    mkdir "$plugin_dir/rootfs"
    tar -C "$plugin_dir/rootfs" -xf "$tarball"
    # The agent's mount root is mounted at its own path: the agent then takes the plugin's
    # propagated copies of its mounts for what they are (agent/zfs/inuse.py).
    python3 - "$here/config.json" "$plugin_dir/config.json" "$agent_mount_root" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
root = sys.argv[3]
for mount in config["mounts"]:
    if mount["name"] == "agent-mnt":
        mount["source"] = mount["destination"] = root
for env in config["env"]:
    if env["name"] in ("FERRY_SEEN_MOUNT_ROOT", "FERRY_AGENT_MOUNT_ROOT"):
        env["value"] = root
json.dump(config, open(sys.argv[2], "w"), indent=2)
PY
    if "${docker_cmd[@]}" plugin inspect "$name" >/dev/null 2>&1; then
        log "$name: replacing the installed plugin"
        "${docker_cmd[@]}" plugin rm --force "$name" >/dev/null
    fi
    "${docker_cmd[@]}" plugin create "$name" "$plugin_dir" >/dev/null
    rm -rf "$plugin_dir"
    trap - EXIT
    "${docker_cmd[@]}" plugin set "$name" "agent-socket.source=$agent_socket_dir"
    "${docker_cmd[@]}" plugin enable "$name" >/dev/null
    log "$name: created and enabled in $(elapsed "$started")s (root filesystem key $content_key); driver name $name"
}

cached_rootfs
if [ "$install" -eq 1 ]; then
    install_plugin
fi
