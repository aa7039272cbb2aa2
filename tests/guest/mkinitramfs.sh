#!/bin/bash
# Build the small Linux guest used by the end-to-end tests and the demo.
#
#   tests/guest/mkinitramfs.sh OUT_DIR
#
# writes OUT_DIR/vmlinuz (the host's Debian kernel) and
# OUT_DIR/initramfs.cpio.gz: busybox (static), fio with every shared library
# it loads, the kernel modules for virtio-blk over PCI, and an /init that
# loads them, waits for the disks, runs /test.sh if present, prints
# "VDISK-GUEST-EXIT=<rc>" on the console and powers off.
#
# A test supplies its /test.sh by appending a second cpio archive to the
# initramfs (the kernel unpacks concatenated archives in order).
#
# Idempotent: when OUT_DIR already holds a build from the same inputs (this
# script, the kernel, busybox, fio), it does nothing.
#
# Environment: VDISK_GUEST_KVER selects a kernel release (default: the newest
# /boot/vmlinuz-* that has a matching /lib/modules directory).
set -euo pipefail

die() { echo "mkinitramfs: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 OUT_DIR"
out=$1
mkdir -p "$out"
out=$(cd "$out" && pwd)

need_file() { [ -e "$1" ] || die "missing $1 ($2)"; }
need_cmd() { command -v "$1" >/dev/null 2>&1 || die "missing command $1 (install package $2)"; }

need_cmd cpio cpio
need_cmd gzip gzip
need_cmd ldd libc-bin
need_cmd modinfo kmod
busybox=/bin/busybox
[ -x "$busybox" ] || busybox=/usr/bin/busybox
need_file "$busybox" "install package busybox-static"
bb_ldd=$(LC_ALL=C ldd "$busybox" 2>&1 || true)
if ! grep -q "not a dynamic executable" <<<"$bb_ldd"; then
    die "$busybox is not statically linked (install package busybox-static)"
fi
fio=$(command -v fio) || die "missing command fio (install package fio)"

# --- the kernel -------------------------------------------------------------
if [ -n "${VDISK_GUEST_KVER:-}" ]; then
    kver=$VDISK_GUEST_KVER
else
    kver=
    for k in $(for f in /boot/vmlinuz-*; do [ -e "$f" ] && echo "${f#/boot/vmlinuz-}"; done | sort -V -r); do
        if [ -d "/lib/modules/$k/kernel" ]; then kver=$k; break; fi
    done
    [ -n "$kver" ] || die "no /boot/vmlinuz-* with modules in /lib/modules (install package linux-image-amd64)"
fi
kernel=/boot/vmlinuz-$kver
need_file "$kernel" "install package linux-image-amd64"
need_file "/lib/modules/$kver/modules.dep" "modules of kernel $kver"
[ -r "$kernel" ] || die "$kernel is not readable (run as root)"

# --- up to date? ------------------------------------------------------------
stamp_of() { stat -L -c '%n %s %Y' "$@"; }
stamp=$( {
    sha256sum "$0" | cut -d' ' -f1
    echo "kver=$kver"
    stamp_of "$kernel" "$busybox" "$fio" "/lib/modules/$kver/modules.dep"
} )
if [ -f "$out/initramfs.cpio.gz" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/stamp" ] &&
    [ "$(cat "$out/stamp")" = "$stamp" ]; then
    exit 0
fi

# --- staging tree -----------------------------------------------------------
stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,etc,lib/modules,root,mnt}

cp "$busybox" "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] && continue
    ln -sf busybox "$root/bin/$applet"
done

# fio and every library it loads, at the paths ldd resolved them to.
copy_with_parents() {
    local src=$1 dst=$root$1
    [ -e "$dst" ] && return 0
    mkdir -p "$(dirname "$dst")"
    cp -L "$src" "$dst"
}
copy_with_parents "$fio"
[ "$fio" = /usr/bin/fio ] || { mkdir -p "$root/usr/bin"; ln -sf "$fio" "$root/usr/bin/fio"; }
libs=$(LC_ALL=C ldd "$fio") || die "ldd $fio failed"
if grep -q "not found" <<<"$libs"; then
    die "fio needs libraries that are missing: $(grep 'not found' <<<"$libs" | tr -s ' \t' ' ')"
fi
while read -r lib; do
    [ -n "$lib" ] || continue
    need_file "$lib" "needed by fio"
    copy_with_parents "$lib"
done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$libs")
# Debian's loader path is /lib64/ld-linux-x86-64.so.2; merged-/usr systems
# resolve /lib, /lib64 through symlinks, which the guest does not have, so the
# copies above already sit at the literal paths ldd printed.

# --- kernel modules, dependencies first --------------------------------------
declare -A seen=()
order=()
add_module() {
    local m=${1//-/_} dep file
    [ -n "${seen[$m]:-}" ] && return 0
    seen[$m]=1
    file=$(modinfo -k "$kver" -F filename "$m" 2>/dev/null | head -n1) || true
    if [ -z "$file" ]; then
        if grep -qE "/${m//_/[-_]}\.ko" "/lib/modules/$kver/modules.builtin" 2>/dev/null; then
            return 0
        fi
        die "kernel module $m not found for kernel $kver"
    fi
    case $file in
        "(builtin)"|"") return 0 ;;
    esac
    for dep in $(modinfo -k "$kver" -F depends "$m" | tr ',' ' '); do
        add_module "$dep"
    done
    need_file "$file" "module $m"
    case $file in
        *.ko) cp "$file" "$root/lib/modules/$m.ko" ;;
        *.ko.xz) xz -dc "$file" >"$root/lib/modules/$m.ko" ;;
        *.ko.zst) zstd -qdc "$file" >"$root/lib/modules/$m.ko" ;;
        *.ko.gz) gzip -dc "$file" >"$root/lib/modules/$m.ko" ;;
        *) die "module $m: unknown file type $file" ;;
    esac
    order+=("$m")
}
# virtio_blk needs the virtio core and ring; virtio_pci brings the PCI
# transport (and in 6.1 its modern/legacy helper modules).
for m in virtio_ring virtio virtio_pci virtio_blk; do add_module "$m"; done
printf '%s\n' "${order[@]}" >"$root/lib/modules/order"

# --- /init ------------------------------------------------------------------
cat >"$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /tmp
for m in $(cat /lib/modules/order); do
    insmod /lib/modules/$m.ko || echo "VDISK-GUEST: insmod $m failed"
done
# Wait (up to ~10 s) for one /dev/vdX per virtio-blk PCI function
# (vendor 0x1af4, device 0x1001 transitional or 0x1042 modern).
want=0
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor)" = 0x1af4 ] || continue
    case $(cat $d/device) in 0x1001|0x1042) want=$((want + 1)) ;; esac
done
i=0
while :; do
    have=$(ls -d /sys/block/vd* 2>/dev/null | wc -l)
    [ "$have" -ge "$want" ] && break
    [ $i -ge 100 ] && { echo "VDISK-GUEST: only $have of $want virtio disks appeared"; break; }
    sleep 0.1
    i=$((i + 1))
done
rc=none
if [ -f /test.sh ]; then
    cd /root
    sh /test.sh
    rc=$?
    cd /
fi
sync
echo
echo "VDISK-GUEST-EXIT=$rc"
poweroff -f
INIT
chmod 755 "$root/init"
echo "vdisk-guest" >"$root/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"

# --- pack -------------------------------------------------------------------
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) |
    gzip -1 -n >"$stage/initramfs.cpio.gz"
cp "$kernel" "$stage/vmlinuz"
mv -f "$stage/initramfs.cpio.gz" "$out/initramfs.cpio.gz"
mv -f "$stage/vmlinuz" "$out/vmlinuz"
printf '%s\n' "$stamp" >"$out/stamp"
echo "mkinitramfs: built $out/initramfs.cpio.gz ($(du -h "$out/initramfs.cpio.gz" | cut -f1)) for kernel $kver" >&2
