#!/bin/bash
# Install the Debian packages that vdisk's end-to-end tests and demo need:
# QEMU (qemu-system-x86 and qemu-utils, from bookworm-backports on Debian 12),
# fio, busybox-static, cpio and a kernel (linux-image-amd64) for the guest.
#
# Safe to run again: it installs only what is missing and runs
# `apt-get update` only when it installs something. Needs root (or sudo).
set -euo pipefail

log() { echo "install-deps: $*" >&2; }
die() { log "$*"; exit 1; }

if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "run as root"
    exec sudo -E bash "$0" "$@"
fi
command -v apt-get >/dev/null 2>&1 || die "this script supports Debian (apt-get not found)"

# shellcheck disable=SC1091
codename=$( . /etc/os-release && echo "${VERSION_CODENAME:-}")

installed_version() {
    dpkg-query -W -f='${db:Status-Status} ${Version}\n' "$1" 2>/dev/null |
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
    if grep -rqsE '^[^#]*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        return 0
    fi
    local src=/etc/apt/sources.list.d/debian.sources
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
            }' "$src" >/etc/apt/sources.list.d/backports.sources.tmp
        [ -s /etc/apt/sources.list.d/backports.sources.tmp ] ||
            die "found no bookworm stanza in $src to copy for bookworm-backports"
        mv /etc/apt/sources.list.d/backports.sources.tmp /etc/apt/sources.list.d/backports.sources
        log "added /etc/apt/sources.list.d/backports.sources"
    elif [ -f /etc/apt/sources.list ]; then
        local line
        line=$(grep -m1 -E '^deb[[:space:]]+([^[:space:]]+[[:space:]]+)?[^[:space:]]+[[:space:]]+bookworm[[:space:]]' /etc/apt/sources.list) ||
            die "found no bookworm line in /etc/apt/sources.list to copy for bookworm-backports"
        sed -E 's/[[:space:]]bookworm[[:space:]]/ bookworm-backports /' <<<"$line" >/etc/apt/sources.list.d/backports.list
        log "added /etc/apt/sources.list.d/backports.list"
    else
        die "no Debian apt source found to copy for bookworm-backports"
    fi
}

export DEBIAN_FRONTEND=noninteractive
if [ ${#missing_qemu[@]} -gt 0 ] && [ "$codename" = bookworm ]; then
    add_backports
fi
log "installing: ${missing[*]} ${missing_qemu[*]}"
apt-get update -q
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ ${#missing_qemu[@]} -gt 0 ]; then
    if [ "$codename" = bookworm ]; then
        apt-get install -y -q --no-install-recommends -t bookworm-backports "${missing_qemu[@]}"
    else
        apt-get install -y -q --no-install-recommends "${missing_qemu[@]}"
    fi
fi
log "done"
