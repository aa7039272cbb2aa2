#!/bin/bash
# vdisk demo: serve a disk with vdiskd and use it from a Linux guest in QEMU.
#
#   scripts/demo.sh            (as root, on Debian 12)
#
# Installs what it needs (scripts/install-deps.sh), builds vdiskd in release
# mode, creates a sparse 256 MiB disk image, exports it with
#   vdiskd --export socket=…,file=…,serial=vdisk-demo
# boots a small guest (host kernel, busybox, fio) under QEMU's TCG emulator,
# where a script shows the disk's size and serial, writes and reads back a
# pattern and runs a short fio job with verification; then checks the
# pattern in the image file on the host, stops vdiskd with SIGTERM and prints
# a summary. Everything lives under $VDISK_DEMO_DIR (default ./demo).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
demo=${VDISK_DEMO_DIR:-$PWD/demo}
size_mib=256
serial=vdisk-demo
guest_timeout=${VDISK_DEMO_TIMEOUT:-300}

if [ -t 1 ]; then
    say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
else
    say() { printf '\n== %s\n' "$*"; }
fi
die() { echo "demo: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (the guest boots the host's kernel, readable by root only)"

say "Installing packages (if missing)"
"$repo/scripts/install-deps.sh"

say "Building vdiskd (release)"
command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust first"
(cd "$repo" && cargo build --release --bin vdiskd)
target_dir=$(cd "$repo" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
vdiskd=$target_dir/release/vdiskd
[ -x "$vdiskd" ] || die "vdiskd not found at $vdiskd"

say "Building the guest (kernel + initramfs) in $demo/guest"
mkdir -p "$demo"
demo=$(cd "$demo" && pwd)
"$repo/tests/guest/mkinitramfs.sh" "$demo/guest"

say "Creating a sparse ${size_mib} MiB disk image"
disk=$demo/disk.img
sock=$demo/vhost.sock
rm -f "$disk" "$sock"
truncate -s "${size_mib}M" "$disk"
ls -ls "$disk"

say "Starting vdiskd"
mkdir -p "$demo/state"
spec="socket=$sock,file=$disk,serial=$serial"
echo "$vdiskd --export $spec"
"$vdiskd" --state-dir "$demo/state" --control "$demo/control.sock" \
    --export "$spec" 2>"$demo/vdiskd.log" &
vdiskd_pid=$!
stop_vdiskd() {
    if [ -n "${vdiskd_pid:-}" ] && kill -0 "$vdiskd_pid" 2>/dev/null; then
        kill -TERM "$vdiskd_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$vdiskd_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$vdiskd_pid" 2>/dev/null || true
    fi
}
trap stop_vdiskd EXIT
for _ in $(seq 200); do
    [ -S "$sock" ] && break
    kill -0 "$vdiskd_pid" 2>/dev/null || { cat "$demo/vdiskd.log" >&2; die "vdiskd exited"; }
    sleep 0.05
done
[ -S "$sock" ] || { cat "$demo/vdiskd.log" >&2; die "vdiskd did not create $sock"; }
echo "vdiskd (pid $vdiskd_pid) listening on $sock; log: $demo/vdiskd.log"

# The guest's /test.sh. Lines starting with "DEMO " are read back below.
stage=$(mktemp -d)
cat >"$stage/test.sh" <<'GUEST'
echo "DEMO size-bytes $(( $(cat /sys/block/vda/size) * 512 ))"
echo "DEMO serial $(cat /sys/block/vda/serial)"
echo "DEMO queues $(ls -d /sys/block/vda/mq/* | wc -l)"
seq 1 300000 | head -c 1048576 > /tmp/pattern
if dd if=/tmp/pattern of=/dev/vda bs=1M seek=16 oflag=direct conv=notrunc 2>/dev/null &&
    dd if=/dev/vda of=/tmp/readback bs=1M skip=16 count=1 iflag=direct 2>/dev/null &&
    cmp /tmp/pattern /tmp/readback; then
    echo "DEMO pattern ok"
else
    echo "DEMO pattern FAILED"
fi
echo "--- fio: 4 KiB random writes, read back and verified (crc32c) ---"
if fio --name=demo --filename=/dev/vda --offset=64M --size=64M --rw=randwrite --bs=4k \
        --ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --eta=never --output=/tmp/fio.out; then
    echo "DEMO fio ok"
else
    echo "DEMO fio FAILED"
fi
grep -E 'err=|IOPS=|verify' /tmp/fio.out
echo "DEMO fio-write $(sed -n 's/^ *write: \(IOPS=[^,]*\), BW=\([^ ]*\).*/\1 \2/p' /tmp/fio.out)"
echo "DEMO fio-verify $(sed -n 's/^ *read: \(IOPS=[^,]*\), BW=\([^ ]*\).*/\1 \2/p' /tmp/fio.out)"
GUEST
(cd "$stage" && echo test.sh | cpio --quiet -o -H newc -R 0:0) >"$stage/test.cpio"
initrd=$demo/initrd
# Decompressed on the host: the emulated guest CPU would take seconds.
gzip -dc "$demo/guest/initramfs.cpio.gz" >"$initrd"
pad=$(( (4 - $(stat -c %s "$initrd") % 4) % 4 ))
head -c "$pad" /dev/zero >>"$initrd"
cat "$stage/test.cpio" >>"$initrd"
rm -rf "$stage"

say "Booting the guest (QEMU, TCG emulation: about 20 s)"
console=$demo/console.log
set +e
timeout -k 5 "$guest_timeout" qemu-system-x86_64 \
    -accel tcg -machine q35 -cpu max -smp 1 -m 512M \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -nodefaults -no-user-config -display none -no-reboot -serial stdio \
    -kernel "$demo/guest/vmlinuz" -initrd "$initrd" \
    -append "console=ttyS0 quiet panic=-1" \
    -chardev "socket,id=vdisk0,path=$sock" \
    -device vhost-user-blk-pci,chardev=vdisk0,num-queues=1 \
    </dev/null 2>&1 | tr -d '\r' | tee "$console"
qemu_rc=${PIPESTATUS[0]}
set -e

# Did the guest's writes reach the image file?
host_pattern=failed
if cmp -s <(seq 1 300000 | head -c 1048576) <(dd if="$disk" bs=1M skip=16 count=1 2>/dev/null); then
    host_pattern=ok
fi

say "Stopping vdiskd (SIGTERM)"
kill -TERM "$vdiskd_pid"
set +e
wait "$vdiskd_pid"
vdiskd_rc=$?
set -e
vdiskd_pid=

value() { sed -n "s/^DEMO $1 //p" "$console" | tail -n1; }
size=$(value size-bytes)
got_serial=$(value serial)
fail=0
check() { # check LABEL VALUE OK?
    if [ "$3" = yes ]; then printf '  %-34s %-22s ok\n' "$1" "$2"
    else printf '  %-34s %-22s FAILED\n' "$1" "$2"; fail=1; fi
}
is() { [ "$1" = "$2" ] && echo yes || echo no; }

say "Summary"
echo "  image: $disk ($(du -h "$disk" | cut -f1) allocated of ${size_mib} MiB)"
check "guest booted and ran its script" "qemu exit $qemu_rc" "$(is "$(grep -c '^VDISK-GUEST-EXIT=0' "$console")" 1)"
check "disk size seen by the guest" "${size:-?} bytes" "$(is "$size" $((size_mib * 1048576)))"
check "serial seen by the guest" "${got_serial:-?}" "$(is "$got_serial" "$serial")"
check "pattern written and read back" "$(value pattern)" "$(is "$(value pattern)" ok)"
check "pattern found in the host image" "$host_pattern" "$(is "$host_pattern" ok)"
check "fio random write + verify" "$(value fio)" "$(is "$(value fio)" ok)"
check "vdiskd exited on SIGTERM" "exit $vdiskd_rc" "$(is "$vdiskd_rc" 0)"
echo "  fio (emulated guest CPU, so slow): write $(value fio-write), verify read $(value fio-verify)"
if [ "$fail" -eq 0 ]; then
    echo; echo "DEMO PASSED"
else
    echo; echo "DEMO FAILED (console: $console, vdiskd log: $demo/vdiskd.log)"
    exit 1
fi
