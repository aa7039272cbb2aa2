#!/bin/bash
# Install the Debian packages that vdisk's end-to-end tests and demo need:
# QEMU (qemu-system-x86 and qemu-utils, from bookworm-backports on Debian 12),
# fio, busybox-static, cpio and a kernel (linux-image-amd64) for the guest.
#
# Safe to run again: it installs only what is missing and runs
# `apt-get update` only when it installs something. Needs root (or sudo).
# Every failure ends with one line saying what is missing and what to do.
#
# tests/install_deps.rs runs this script against PATH shims for dpkg-query
# and apt-get; for that, VDISK_APT_DIR (default /etc/apt) and
# VDISK_OS_RELEASE (default /etc/os-release) name where it looks.
set -euo pipefail

log() { echo "install-deps: $*" >&2; }
die() { log "$*"; exit 1; }
# Anything that fails without its own message still says where and why.
trap 'log "failed at line $LINENO (exit $?); fix the cause above and run scripts/install-deps.sh again"' ERR

apt_dir=${VDISK_APT_DIR:-/etc/apt}
os_release=${VDISK_OS_RELEASE:-/etc/os-release}

if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "run as root"
    exec sudo -E bash "$0" "$@"
fi
command -v apt-get >/dev/null 2>&1 ||
    die "apt-get not found: this script supports Debian; install QEMU (>= 9), fio, busybox-static, cpio and a kernel by hand"
command -v dpkg-query >/dev/null 2>&1 ||
    die "dpkg-query not found: this script supports Debian; install the packages listed in scripts/install-deps.sh by hand"

# shellcheck disable=SC1090
codename=$( . "$os_release" 2>/dev/null && echo "${VERSION_CODENAME:-}") || codename=

# Prints the installed version of package $1, or nothing. Never fails: on a
# fresh machine dpkg-query exits non-zero for a package it has never heard
# of, and under `set -e -o pipefail` that must not end the script.
installed_version() {
    { dpkg-query -W -f='${db:Status-Status} ${Version}\n' "$1" 2>/dev/null || true; } |
        awk '$1 == "installed" { print $2 }'
}

# Packages from the release itself.
# systemd gives systemd-analyze (tests/daemon.rs verifies the unit); util-linux
# gives taskset (the benchmark pins daemon and client apart).
base_pkgs=(fio busybox-static cpio linux-image-amd64 kmod gzip systemd util-linux)
# QEMU: Debian 12's own 7.2 lacks what the harness uses (reconnect-ms), so
# on bookworm it comes from bookworm-backports.
qemu_pkgs=(qemu-system-x86 qemu-utils)

missing=()
for p in "${base_pkgs[@]}"; do
    [ -n "$(installed_version "$p")" ] || missing+=("$p")
done
missing_qemu=()
for p in "${qemu_pkgs[@]}"; do
    v=$(installed_version "$p")
    if [ -z "$v" ]; then
        missing_qemu+=("$p")
    elif [ "$codename" = bookworm ] && [[ $v != *bpo* ]]; then
        missing_qemu+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ] && [ ${#missing_qemu[@]} -eq 0 ]; then
    log "all packages present"
    exit 0
fi

# Add bookworm-backports when it is not configured yet, by copying the
# system's own Debian source stanza with only its suite changed.
add_backports() {
    if grep -rqsE '^[^#]*bookworm-backports' "$apt_dir/sources.list" "$apt_dir/sources.list.d/"; then
        return 0
    fi
    local src=$apt_dir/sources.list.d/debian.sources
    if [ -f "$src" ]; then
        # The first deb822 stanza whose Suites: has the word "bookworm".
        awk -v RS= '
            $0 ~ /(^|\n)Suites:([ \t][^\n]*)?[ \t]bookworm([ \t]|\n|$)/ && !done {
                n = split($0, lines, "\n")
                for (i = 1; i <= n; i++) {
                    if (lines[i] ~ /^Suites:/) lines[i] = "Suites: bookworm-backports"
                    printf "%s\n", lines[i]
                }
                done = 1
            }' "$src" >"$apt_dir/sources.list.d/backports.sources.tmp"
        if [ ! -s "$apt_dir/sources.list.d/backports.sources.tmp" ]; then
            rm -f "$apt_dir/sources.list.d/backports.sources.tmp"
            die "found no bookworm stanza in $src to copy for bookworm-backports; add bookworm-backports to apt's sources and run again"
        fi
        mv "$apt_dir/sources.list.d/backports.sources.tmp" "$apt_dir/sources.list.d/backports.sources"
        log "added $apt_dir/sources.list.d/backports.sources"
    elif [ -f "$apt_dir/sources.list" ]; then
        local line
        line=$(grep -m1 -E '^deb[[:space:]]+([^[:space:]]+[[:space:]]+)?[^[:space:]]+[[:space:]]+bookworm[[:space:]]' "$apt_dir/sources.list") ||
            die "found no bookworm line in $apt_dir/sources.list to copy for bookworm-backports; add bookworm-backports to apt's sources and run again"
        sed -E 's/[[:space:]]bookworm[[:space:]]/ bookworm-backports /' <<<"$line" >"$apt_dir/sources.list.d/backports.list"
        log "added $apt_dir/sources.list.d/backports.list"
    else
        die "no Debian apt source in $apt_dir to copy for bookworm-backports; add bookworm-backports to apt's sources and run again"
    fi
}

export DEBIAN_FRONTEND=noninteractive
if [ ${#missing_qemu[@]} -gt 0 ] && [ "$codename" = bookworm ]; then
    add_backports
fi
log "installing: ${missing[*]} ${missing_qemu[*]}"
apt-get update -q ||
    die "apt-get update failed, so ${missing[*]} ${missing_qemu[*]} cannot be installed; check apt's sources and the network, then run again"
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${missing[@]}" ||
        die "apt-get install failed for: ${missing[*]}; install them by hand (apt-get install ${missing[*]}) and run again"
fi
if [ ${#missing_qemu[@]} -gt 0 ]; then
    if [ "$codename" = bookworm ]; then
        apt-get install -y -q --no-install-recommends -t bookworm-backports "${missing_qemu[@]}" ||
            die "apt-get install -t bookworm-backports failed for: ${missing_qemu[*]}; QEMU >= 9 is needed, install it by hand and run again"
    else
        apt-get install -y -q --no-install-recommends "${missing_qemu[@]}" ||
            die "apt-get install failed for: ${missing_qemu[*]}; install QEMU (>= 9) by hand and run again"
    fi
fi
log "done"
