#!/usr/bin/env bash
# Builds the container images Ferry's tests and demo use, without a registry:
# root filesystems are made from Debian packages and `docker import`ed.
#
#   deploy/images/build.sh [--cache-dir DIR] [--docker-host URL] IMAGE...
#
# IMAGE is ferry/postgres:15 (PostgreSQL 15 from Debian bookworm, debootstrap
# minbase) or ferry/toolbox (busybox, for file and checksum tests).
# Root filesystem tarballs are cached in DIR (default /var/cache/ferry/images)
# under a key made from the content of this directory, so a second run only
# imports (seconds), and an image already in the daemon with the same key is
# left alone. Environment: FERRY_DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_dir=/var/cache/ferry/images
docker_host="${DOCKER_HOST:-}"
mirror="${FERRY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
apt_opts=(-o DPkg::Lock::Timeout=600 -o Acquire::Retries=3)
images=()

usage() { sed -n '2,13p' "$0"; }
log() { printf 'build.sh: %s\n' "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

while [ "$#" -gt 0 ]; do
    case "$1" in
        --cache-dir) [ "$#" -ge 2 ] || die "--cache-dir needs a directory"; cache_dir="$2"; shift 2 ;;
        --docker-host) [ "$#" -ge 2 ] || die "--docker-host needs a URL (e.g. unix:///run/docker.sock)"; docker_host="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option '$1' (see --help)" ;;
        *) images+=("$1"); shift ;;
    esac
done
[ "${#images[@]}" -gt 0 ] || die "name at least one image: ferry/postgres:15, ferry/toolbox"
[ "$(id -u)" -eq 0 ] || die "run as root (debootstrap and chroot need it)"

docker_cmd=(docker)
if [ -n "$docker_host" ]; then
    docker_cmd+=(-H "$docker_host")
fi
"${docker_cmd[@]}" version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "no Docker daemon answers at ${docker_host:-the default socket}; start dockerd or pass --docker-host"

# The cache key covers everything that shapes an image: this script and its files.
content_key="$(cd "$here" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
mkdir -p "$cache_dir"

now() { date +%s%N; }
elapsed() {
    local ms=$((($(now) - $1) / 1000000))
    printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}

apt_get_host() {
    DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" "$@"
}

ensure_host_tool() {
    local tool="$1" package="$2"
    command -v "$tool" >/dev/null 2>&1 && return 0
    log "installing $package (needed for $tool)"
    apt_get_host update -qq
    apt_get_host install -y -qq --no-install-recommends "$package" >/dev/null
}

# Removes what a container never needs: documentation, translations, apt lists, logs.
slim_rootfs() {
    local root="$1"
    rm -rf "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
        "$root"/usr/share/locale/* "$root"/usr/share/lintian/* "$root"/usr/share/i18n/* \
        "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/cache/debconf/*-old "$root"/var/lib/dpkg/*-old "$root"/var/log/* "$root"/tmp/*
}

build_postgres_rootfs() {
    local root="$1"
    ensure_host_tool debootstrap debootstrap
    log "debootstrap --variant=minbase $suite from $mirror"
    debootstrap --variant=minbase "$suite" "$root" "$mirror" >>"$build_log" 2>&1 \
        || die "debootstrap failed; see the end of $build_log"
    cat >"$root/etc/dpkg/dpkg.cfg.d/01-ferry-slim" <<'EOF'
path-exclude=/usr/share/doc/*
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/lintian/*
EOF
    # No services start in a chroot, and the image makes its cluster at run time.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    mkdir -p "$root/etc/postgresql-common"
    echo 'create_main_cluster = false' >"$root/etc/postgresql-common/createcluster.conf"
    log "installing postgresql-15 in the root filesystem"
    {
        chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" update \
            && chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive \
                apt-get "${apt_opts[@]}" install -y --no-install-recommends postgresql-15 \
            && chroot "$root" apt-get clean \
            && chroot "$root" dpkg --purge --force-depends libllvm14 libz3-4 locales \
                perl perl-modules-5.36 libperl5.36
    } >>"$build_log" 2>&1 || die "installing postgresql-15 failed; see the end of $build_log"
    # JIT (LLVM, 130 MB) is off in this image; C.UTF-8 is built into libc, no locales needed;
    # full perl only serves postgresql-common's cluster wrappers: PATH leads to the binaries.
    rm -rf "$root/usr/sbin/policy-rc.d" "$root"/usr/lib/postgresql/15/lib/llvmjit* \
        "$root/usr/lib/postgresql/15/lib/bitcode"
    install -m 0755 "$here/postgres/entrypoint.sh" "$root/usr/local/bin/ferry-postgres-entrypoint"
    slim_rootfs "$root"
}

build_toolbox_rootfs() {
    local root="$1" debs="$1.debs" applet
    mkdir -p "$debs" "$root/bin" "$root/etc" "$root/tmp" "$root/data"
    if ! (cd "$debs" && apt_get_host download busybox-static >/dev/null 2>&1); then
        apt_get_host update -qq
        (cd "$debs" && apt_get_host download busybox-static >/dev/null) \
            || die "could not download busybox-static with apt-get; check the Debian mirror"
    fi
    dpkg-deb -x "$debs"/busybox-static_*.deb "$debs/extract"
    install -m 0755 "$debs/extract/bin/busybox" "$root/bin/busybox"
    for applet in $("$root/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
    chmod 1777 "$root/tmp"
}

import_changes() {
    local image="$1"
    local -a changes=(--change "LABEL ferry.image.key=$content_key" --change "WORKDIR /")
    case "$image" in
        ferry/postgres:15) changes+=(
            --change "ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            --change "ENV PGDATA=/var/lib/postgresql/data"
            --change "ENV LANG=C.UTF-8"
            --change "USER root"
            --change "EXPOSE 5432"
            --change 'ENTRYPOINT ["/usr/local/bin/ferry-postgres-entrypoint"]'
            --change 'CMD ["postgres"]') ;;
        ferry/toolbox) changes+=(
            --change "ENV PATH=/bin"
            --change "USER root"
            --change 'CMD ["/bin/sh"]') ;;
    esac
    printf '%s\n' "${changes[@]}"
}

# Makes (or finds) the cached root filesystem tarball of one image; prints its path.
cached_tarball() {
    local image="$1" slug="$2" builder="$3"
    local tarball="$cache_dir/$slug-$content_key.tar" work started stale
    if [ -s "$tarball" ]; then
        log "$image: cached root filesystem $tarball"
        printf '%s\n' "$tarball"
        return 0
    fi
    started="$(now)"
    work="$(mktemp -d "$cache_dir/.build-$slug-XXXXXX")"
    # shellcheck disable=SC2064  # expand $work now: it is local to this function
    trap "rm -rf '$work' '$work'.*" EXIT
    build_log="$cache_dir/$slug.build.log"
    : >"$build_log"
    "$builder" "$work/rootfs" >&2
    tar --numeric-owner --one-file-system -C "$work/rootfs" \
        --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* -cf "$work/rootfs.tar" .
    mv "$work/rootfs.tar" "$tarball"
    rm -rf "$work" "$work".*
    trap - EXIT
    for stale in "$cache_dir/$slug"-*.tar; do
        [ "$stale" = "$tarball" ] || rm -f "$stale"
    done
    log "$image: built root filesystem in $(elapsed "$started")s: $tarball ($(du -h "$tarball" | cut -f1))"
    printf '%s\n' "$tarball"
}

build_image() {
    local image="$1" slug builder tarball present started lock_fd
    local -a changes
    case "$image" in
        ferry/postgres:15) slug=postgres-15; builder=build_postgres_rootfs ;;
        ferry/toolbox|ferry/toolbox:latest) image=ferry/toolbox; slug=toolbox; builder=build_toolbox_rootfs ;;
        *) die "unknown image '$image'; this script builds ferry/postgres:15 and ferry/toolbox" ;;
    esac
    started="$(now)"
    present="$("${docker_cmd[@]}" image inspect --format '{{index .Config.Labels "ferry.image.key"}}' "$image" 2>/dev/null || true)"
    if [ "$present" = "$content_key" ]; then
        log "$image: already in the daemon with key $content_key; nothing to do"
        return 0
    fi
    # One build per image at a time, across concurrent test runs.
    exec {lock_fd}>"$cache_dir/$slug.lock"
    flock "$lock_fd"
    tarball="$(cached_tarball "$image" "$slug" "$builder")"
    exec {lock_fd}>&-
    mapfile -t changes < <(import_changes "$image")
    "${docker_cmd[@]}" import "${changes[@]}" "$tarball" "$image" >/dev/null
    log "$image: imported in $(elapsed "$started")s, size $("${docker_cmd[@]}" image inspect --format '{{.Size}}' "$image") bytes, key $content_key"
}

for image in "${images[@]}"; do
    build_image "$image"
done
