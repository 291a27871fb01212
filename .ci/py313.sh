#!/usr/bin/env bash
# Run the whole test suite under Python 3.13, inside a Debian 13 (trixie) root made with
# debootstrap.
#
# Usage (as root):
#   bash .ci/py313.sh                 # the whole suite
#   bash .ci/py313.sh -x -k publish   # any arguments go to pytest
#
# What it does:
#   1. Builds the root once with debootstrap (installing debootstrap if missing) and caches it
#      outside the repository; a stamp file marks a finished build, so later runs reuse it.
#   2. Mounts /proc, /sys, /dev (with /dev/pts and a fresh tmpfs on /dev/shm), the host's
#      Cloud SDK (read-only: the Pub/Sub emulator lives there), /etc/resolv.conf, and the
#      host's pip configuration with every local file or directory it names (certificate,
#      constraints, find-links, file:// indexes), so pip inside reaches the same index.
#   3. Clones this repository at its HEAD (committed code only) into <root>/work/loopgate,
#      fresh each run, makes a venv there with the root's python3, installs '.[dev]', prints
#      the versions that were resolved, and runs `python -m pytest "$@"`.
#   4. Unmounts everything on exit, failure or interrupt included. Mounts left behind by a run
#      that was killed are cleared at the start of the next one.
#
# Settings (environment):
#   LOOPGATE_PY313_ROOT         where the root is kept (default /var/cache/loopgate/py313-root)
#   LOOPGATE_PY313_MIRROR       Debian mirror for debootstrap (default: the one the host's apt
#                               uses; apt's proxy setting, if any, is passed to debootstrap)
#   LOOPGATE_PY313_REBUILD=1    build the root again even if a finished one is cached
#   LOOPGATE_PY313_CONSTRAINTS  a pip constraints file on the host, applied to the install
#                               (for instance another venv's `pip freeze`, to compare versions)
#
# The exit status is pytest's, or non-zero with a message if the root or the venv could not be
# made.
set -euo pipefail

SUITE=trixie
PACKAGES=python3,python3-venv,python3-dev,gcc,openjdk-21-jre-headless,git,make,procps,ca-certificates
# Installed with apt-get once the root is made (debootstrap's own resolver is not up to their
# dependencies): Node.js for the JavaScript client's tests, Chromium for the console's.
EXTRA_PACKAGES="nodejs npm chromium"
BUILT_WITH="$PACKAGES $EXTRA_PACKAGES"
SDK_DIR=/usr/lib/google-cloud-sdk
ROOT=${LOOPGATE_PY313_ROOT:-/var/cache/loopgate/py313-root}
ROOT=${ROOT%/}
STAMP=$ROOT/.loopgate-root-built
WORKDIR=/work/loopgate  # the clone, as seen inside the root
REPO=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)

log() { printf '[py313] %s\n' "$*" >&2; }
die() { printf '[py313] error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (debootstrap, mount and chroot need it)"
case "$ROOT/" in
    "$REPO"/*) die "LOOPGATE_PY313_ROOT ($ROOT) must lie outside the repository" ;;
    /) die "LOOPGATE_PY313_ROOT must not be /" ;;
esac

# -- mounts --------------------------------------------------------------------------------

MOUNTED=()  # mount points made by this run, in order

# Mount points under $1 (itself included), deepest first, as the kernel lists them.
mounts_under() {
    local prefix=$1
    awk '{ print $5 }' /proc/self/mountinfo | while read -r point; do
        point=$(printf '%b' "$point")  # mountinfo escapes spaces and such as \040
        if [[ $point == "$prefix" || $point == "$prefix"/* ]]; then
            printf '%s\n' "$point"
        fi
    done | sort -r -u
}

unmount() {
    umount "$1" 2>/dev/null || umount -l "$1" 2>/dev/null \
        || log "warning: could not unmount $1"
}

# Unmount whatever is still mounted under $1: the leftovers of a run that was killed before
# it could clean up, or of an interrupted debootstrap.
clear_mounts() {
    local point
    while read -r point; do
        [[ -n $point ]] || continue
        log "unmounting stale $point"
        unmount "$point"
    done < <(mounts_under "$1")
    [[ -z $(mounts_under "$1") ]] || die "mounts remain under $1: $(mounts_under "$1" | tr '\n' ' ')"
}

# Processes still running inside the root once the suite is over (an emulator or server that
# a test left behind, or what a killed earlier run left): this run's lock guarantees they belong
# to no other run. They would keep the mounts busy, so they are stopped first.
stop_leftovers() {
    local pid pids=() root
    [[ -d $ROOT ]] || return 0
    root=$(readlink -f "$ROOT")
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        [[ $(readlink "/proc/$pid/root" 2>/dev/null) == "$root" ]] && pids+=("$pid")
    done
    ((${#pids[@]})) || return 0
    log "stopping processes left inside the root: ${pids[*]}"
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 50); do
        kill -0 "${pids[@]}" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

cleanup() {
    local i
    stop_leftovers
    for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
        unmount "${MOUNTED[i]}"
    done
    MOUNTED=()
    [[ -d $ROOT ]] && clear_mounts "$ROOT" || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Refuse a mount point inside the root that passes through a symbolic link: the kernel would
# resolve an absolute link against the host's /, not the root's. A link as the last component
# is replaced by a plain placeholder.
check_target() {
    local inside=$1 path=$ROOT part
    local -a parts
    IFS=/ read -r -a parts <<<"${inside#/}"
    for part in "${parts[@]:0:${#parts[@]}-1}"; do
        path=$path/$part
        [[ ! -L $path ]] || die "will not mount through the symbolic link $path"
    done
    path=$path/${parts[-1]}
    if [[ -L $path ]]; then
        log "replacing the symbolic link $path by a mount point"
        rm -f "$path"
    fi
}

# Bind-mount host path $1 at path $3 inside the root (default: the same path); "ro" as $2
# makes it read-only. The mount is made private, so that what is mounted under it does not
# reach the host.
bind() {
    local source=$1 mode=${2:-rw} inside=${3:-$1}
    local target=$ROOT$inside
    check_target "$inside"
    if [[ -d $source ]]; then
        mkdir -p "$target"
    else
        mkdir -p "$(dirname "$target")"
        [[ -e $target ]] || : >"$target"
    fi
    mount --bind "$source" "$target"
    MOUNTED+=("$target")
    mount --make-private "$target"
    if [[ $mode == ro ]]; then
        mount -o remount,bind,ro "$target"
    fi
}

# -- the host's Debian mirror and apt proxy --------------------------------------------------

# "URI SUITE" for every enabled deb entry of the host's apt sources, one-line and deb822 alike.
apt_sources() {
    local file
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $file ]] || continue
        awk '$1 == "deb" {
            i = 2
            if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            if (i + 1 <= NF) print $i, $(i + 1)
        }' "$file"
    done
    for file in /etc/apt/sources.list.d/*.sources; do
        [[ -f $file ]] || continue
        awk '
            function flush(  n, m, u, s, uris, suites) {
                if (types ~ /(^| )deb( |$)/ && tolower(enabled) != "no") {
                    n = split(uri, uris, " "); m = split(suite, suites, " ")
                    for (u = 1; u <= n; u++) for (s = 1; s <= m; s++) print uris[u], suites[s]
                }
                types = uri = suite = enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            {
                key = tolower($1); sub(/:$/, "", key)
                value = $0; sub(/^[^:]*:[ \t]*/, "", value)
                if (key == "types") types = value
                else if (key == "uris") uri = value
                else if (key == "suites") suite = value
                else if (key == "enabled") enabled = value
            }
            END { flush() }
        ' "$file"
    done
}

# The host's main Debian archive: the entry for the host's own release (not -security or
# -updates), else any entry ending in /debian, else deb.debian.org.
host_mirror() {
    local codename uri suite fallback=""
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    while read -r uri suite; do
        [[ $uri == http://* || $uri == https://* ]] || continue
        if [[ -n $codename && $suite == "$codename" ]]; then
            printf '%s\n' "${uri%/}"
            return
        fi
        [[ -z $fallback && ${uri%/} == */debian ]] && fallback=${uri%/}
    done < <(apt_sources)
    printf '%s\n' "${fallback:-http://deb.debian.org/debian}"
}

# apt's proxy for scheme $1 ("http" or "https") and host $2, if one is configured.
apt_proxy() {
    local scheme=$1 host=$2 value="" per_host="" PROXY=""
    command -v apt-config >/dev/null || return 0
    eval "$(apt-config shell PROXY "Acquire::$scheme::Proxy")"
    value=$PROXY
    PROXY=""
    eval "$(apt-config shell PROXY "Acquire::$scheme::Proxy::$host")"
    per_host=$PROXY
    [[ -n $per_host ]] && value=$per_host
    case $value in DIRECT | direct | false | "") return 0 ;; esac
    printf '%s\n' "$value"
}

# -- building the root ---------------------------------------------------------------------

build_root() {
    local mirror partial=$ROOT.partial host proxy script=$SUITE started
    mirror=${LOOPGATE_PY313_MIRROR:-$(host_mirror)}
    mirror=${mirror%/}
    host=${mirror#*://}
    host=${host%%/*}

    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || die "apt-get update failed"
        apt-get install -y -qq debootstrap >/dev/null || die "could not install debootstrap"
    fi
    # An older debootstrap may not know this suite by name; Debian's testing script fits it.
    [[ -e /usr/share/debootstrap/scripts/$SUITE ]] || script=/usr/share/debootstrap/scripts/sid

    # debootstrap downloads with wget, which reads the proxy from the environment.
    for scheme in http https; do
        local var=${scheme}_proxy
        if [[ -z ${!var:-} ]]; then
            proxy=$(apt_proxy "$scheme" "$host")
            if [[ -n $proxy ]]; then
                export "$var=$proxy"
                log "using apt's $scheme proxy $proxy"
            fi
        fi
    done

    if [[ -e $partial ]]; then
        clear_mounts "$partial"
        rm -rf --one-file-system "$partial"
    fi
    if [[ -e $ROOT ]]; then
        clear_mounts "$ROOT"
        rm -rf --one-file-system "$ROOT"
    fi
    mkdir -p "$(dirname "$ROOT")"

    log "building the $SUITE root in $ROOT from $mirror (takes minutes)"
    started=$SECONDS
    if ! debootstrap --variant=minbase --include="$PACKAGES" \
        "$SUITE" "$partial" "$mirror" "$script" >"$ROOT.build.log" 2>&1; then
        clear_mounts "$partial" || true
        log "debootstrap failed; the end of its output ($ROOT.build.log):"
        tail -n 30 "$ROOT.build.log" >&2 || true
        if [[ -f $partial/debootstrap/debootstrap.log ]]; then
            log "the end of $partial/debootstrap/debootstrap.log:"
            tail -n 30 "$partial/debootstrap/debootstrap.log" >&2 || true
        fi
        exit 1
    fi
    clear_mounts "$partial"
    [[ -x $partial/usr/bin/python3 ]] || die "the root has no python3 (see $ROOT.build.log)"
    log "installing $EXTRA_PACKAGES in the root"
    local proxy_env=() var
    for var in http_proxy https_proxy; do
        [[ -n ${!var:-} ]] && proxy_env+=("$var=${!var}")
    done
    mount --bind /proc "$partial/proc"
    mount --make-private "$partial/proc"
    cp /etc/resolv.conf "$partial/etc/resolv.conf"
    if ! chroot "$partial" /usr/bin/env -i PATH=/usr/bin:/bin:/usr/sbin:/sbin \
        DEBIAN_FRONTEND=noninteractive "${proxy_env[@]}" /bin/sh -c \
        "apt-get update -q && apt-get install -y -q --no-install-recommends $EXTRA_PACKAGES" \
        >>"$ROOT.build.log" 2>&1; then
        clear_mounts "$partial" || true
        log "installing $EXTRA_PACKAGES failed; the end of $ROOT.build.log:"
        tail -n 30 "$ROOT.build.log" >&2 || true
        exit 1
    fi
    clear_mounts "$partial"
    mv "$partial" "$ROOT"
    printf 'suite=%s\nmirror=%s\npackages=%s\nbuilt=%s\n' \
        "$SUITE" "$mirror" "$BUILT_WITH" "$(date -u +%FT%TZ)" >"$STAMP"
    log "root built in $((SECONDS - started))s"
}

# -- the host's pip configuration ----------------------------------------------------------

HOST_HOME=${HOME:-/root}
# The config files pip reads (global, then user), as "host-path:path-inside" (HOME is /root
# inside).
PIP_CONFIG_FILES=(/etc/pip.conf:/etc/pip.conf /etc/xdg/pip/pip.conf:/etc/xdg/pip/pip.conf
    "$HOST_HOME/.config/pip/pip.conf:/root/.config/pip/pip.conf"
    "$HOST_HOME/.pip/pip.conf:/root/.pip/pip.conf")
PIP_PATH_KEYS='cert|client-cert|constraint|constraints|requirement|find-links|index-url|extra-index-url'

# Local files and directories that the host's pip configuration names: in its config files
# and in PIP_* variables. Each word of a value is checked; file:// URLs count as paths.
pip_local_paths() {
    local entry file var word
    {
        for entry in "${PIP_CONFIG_FILES[@]}"; do
            file=${entry%%:*}
            [[ -f $file ]] || continue
            # "key = value" lines and their indented continuation lines
            awk -v keys="^($PIP_PATH_KEYS)$" '
                /^[ \t]*[#;]/ { next }
                /^[ \t]+[^ \t]/ && keep { print; next }
                {
                    keep = 0
                    if (index($0, "=") == 0) next
                    key = substr($0, 1, index($0, "=") - 1); gsub(/[ \t]/, "", key); gsub(/_/, "-", key)
                    if (key ~ keys) { keep = 1; print substr($0, index($0, "=") + 1) }
                }
            ' "$file"
        done
        for var in $(compgen -e | grep '^PIP_' || true); do
            printf '%s\n' "${!var}"
        done
    } | tr ' \t' '\n\n' | while read -r word; do
        word=${word#file://}
        word=${word%/}
        # A local "simple" index links to its files by relative paths (often ../../files/):
        # carry the directory that holds it.
        [[ $word == */simple ]] && word=${word%/simple}
        if [[ $word == /* && -e $word ]]; then
            printf '%s\n' "$word"
        fi
    done | sort -u
}

carry_pip_config() {
    local entry file path
    for entry in "${PIP_CONFIG_FILES[@]}"; do
        file=${entry%%:*}
        if [[ -f $file ]]; then
            log "carrying in $file"
            bind "$file" ro "${entry#*:}"
        fi
    done
    while read -r path; do
        [[ -n $path ]] || continue
        log "carrying in $path (named by pip's configuration)"
        bind "$path" ro
    done < <(pip_local_paths)
}

# -- main ----------------------------------------------------------------------------------

mkdir -p "$(dirname "$ROOT")"
exec 9>"$ROOT.lock"
flock -n 9 || die "another run is using $ROOT ($ROOT.lock is held)"

if [[ -d $ROOT ]]; then
    stop_leftovers
    clear_mounts "$ROOT"
fi
if [[ ${LOOPGATE_PY313_REBUILD:-} == 1 || ! -f $STAMP ]] || ! grep -qx "packages=$BUILT_WITH" "$STAMP"; then
    build_root
else
    log "reusing the root in $ROOT ($(grep '^built=' "$STAMP"))"
fi

# Kernel file systems, then the host's files that the tests and pip need.
bind /proc
bind /sys
bind /dev
bind /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$ROOT/dev/shm"
MOUNTED+=("$ROOT/dev/shm")
[[ -d $SDK_DIR ]] || die "the Cloud SDK is not at $SDK_DIR (the Pub/Sub emulator comes from it)"
bind "$SDK_DIR" ro
bind /etc/resolv.conf ro
carry_pip_config

# A fresh clone of the committed code at HEAD.
commit=$(git -C "$REPO" rev-parse HEAD)
rm -rf --one-file-system "$ROOT$WORKDIR"
mkdir -p "$(dirname "$ROOT$WORKDIR")"
git clone --quiet --no-hardlinks "$REPO" "$ROOT$WORKDIR"
git -C "$ROOT$WORKDIR" -c advice.detachedHead=false checkout --quiet --detach "$commit"
log "testing $(git -C "$ROOT$WORKDIR" log -1 --format='%h %s')"

constraints=""
if [[ -n ${LOOPGATE_PY313_CONSTRAINTS:-} ]]; then
    [[ -f $LOOPGATE_PY313_CONSTRAINTS ]] || die "no such file: $LOOPGATE_PY313_CONSTRAINTS"
    # Editable and local lines of a `pip freeze` are no constraints.
    grep -v -E '^(-e |#|loopgate[=@ ])' "$LOOPGATE_PY313_CONSTRAINTS" \
        >"$ROOT$WORKDIR/.py313-constraints.txt" || true
    constraints="$WORKDIR/.py313-constraints.txt"
    log "installing under the constraints of $LOOPGATE_PY313_CONSTRAINTS"
fi

# The environment inside: a clean one, with the host's pip and proxy settings.
inside_env=(PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8
    "TERM=${TERM:-dumb}" "PY313_CONSTRAINTS=$constraints" "PY313_FREEZE=$ROOT/work/py313-freeze.txt")
for var in $(compgen -e | grep -E '^(PIP_|CI$|PYTEST_ADDOPTS$|(http|https|no|all)_proxy$|(HTTP|HTTPS|NO|ALL)_PROXY$)' || true); do
    inside_env+=("$var=${!var}")
done

# `set +e` around the chroot: its status is the suite's, reported after cleanup.
set +e
chroot "$ROOT" /usr/bin/env -i "${inside_env[@]}" /bin/bash -euo pipefail -c '
    cd "$1"; shift
    python3 -m venv .venv
    . .venv/bin/activate
    echo "[py313] installing .[dev] with $(python --version)" >&2
    # pip warns about each local index that lacks a project; those warnings are left out.
    quiet_pip() {
        pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    }
    quiet_pip install --quiet --upgrade pip
    started=$SECONDS
    quiet_pip install --quiet -e ".[dev]" ${PY313_CONSTRAINTS:+-c "$PY313_CONSTRAINTS"}
    echo "[py313] installed in $((SECONDS - started))s" >&2
    pip freeze --exclude-editable >/work/py313-freeze.txt
    python - <<"EOF"
import importlib.metadata as metadata
import sys

print("Python", sys.version.replace("\n", " "))
for name in ("quart", "quart-schema", "pydantic", "pydantic-core", "typing-extensions",
             "hypercorn", "aiohttp", "google-cloud-pubsub", "grpcio", "pytest",
             "pytest-asyncio", "schemathesis"):
    try:
        print(f"  {name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name}: not installed")
sys.stdout.flush()
EOF
    echo "[py313] every installed version: $PY313_FREEZE" >&2
    exec python -m pytest "$@"
' py313 "$WORKDIR" "$@" 9>&-
status=$?
set -e
log "pytest exited with status $status"
exit "$status"
