#!/bin/bash
# Build the remus test guest: a Debian kernel plus a small busybox initramfs
# that runs tests/guest/init and the static workload program remus-guest.
#
#   scripts/build-guest.sh [OUTDIR]        (default: <repo>/build/guest)
#   scripts/build-guest.sh --workloads [OUTDIR]
#
# --workloads also builds OUTDIR/initrd-workloads.img: the default initrd
# with a second gzip'd cpio archive appended (the kernel unpacks both; the
# default initrd.img stays as small as it is) holding real workloads:
# Debian 12's redis-server (from the redis-server and redis-tools .debs,
# `apt-get download`ed into OUTDIR/cache, with the shared libraries ldd lists
# and the dynamic loader) and /bin/remus-batch (tests/guest/remus-batch.c, a
# memory-heavy radix sort). Knobs remus.redis=PORT and remus.batch=PORT
# (tests/guest/README.md). ldd runs on the host: it needs redis's libraries
# installed, so redis-tools is installed with apt-get when missing (the
# workloads bench needs its redis-benchmark anyway). About 5 MB more initrd;
# boot such a guest with -m 512 or more.
#
# Outputs OUTDIR/vmlinuz (Debian's bzImage), OUTDIR/vmlinux (the same kernel
# uncompressed, an ELF with a PVH entry: QEMU boots it without the slow xz
# decompression, about 2x faster under TCG, but loads it at a fixed 16..75 MiB,
# so a memmap=/remus.counter GPA must lie outside that range), OUTDIR/initrd.img
# and OUTDIR/kernel-version.
# Idempotent: rebuilds only when an input changed (OUTDIR/.stamp); the kernel
# .deb is cached in OUTDIR/cache. Installs busybox-static, cpio, gcc and
# libc6-dev with apt-get when missing.
#
# Environment:
#   REMUS_GUEST_KERNEL_PKG  kernel package (default: what linux-image-amd64
#                           depends on, e.g. linux-image-6.1.0-56-amd64)
#   REMUS_GUEST_EXT4=0      leave out ext4 (+ jbd2, mbcache, crc16, crc32c;
#                           about 0.6 MB of initrd; loaded only on demand with
#                           remus.modules=ext4)
#   REMUS_GUEST_FORCE=1     rebuild even if the stamp matches
#
# Boot (TCG), knobs and measurements: tests/guest/README.md. E.g.
#   qemu-system-x86_64 -accel tcg -machine pc -m 256 -nodefaults -nographic \
#     -vga none -serial file:guest.log -kernel OUTDIR/vmlinux \
#     -initrd OUTDIR/initrd.img -qmp unix:qmp.sock,server=on,wait=off \
#     -append 'console=ttyS0 quiet memmap=64K$0x8000000 remus.counter=0x8000000
#              remus.dirty=10000 remus.wss=64 remus.check=1'
set -euo pipefail

say() { echo "build-guest: $*"; }
die() { echo "build-guest: ERROR: $*" >&2; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKLOADS=0
if [ "${1:-}" = --workloads ]; then
	WORKLOADS=1
	shift
fi
OUT=${1:-$REPO/build/guest}
mkdir -p "$OUT/cache"
OUT=$(cd "$OUT" && pwd)
CACHE=$OUT/cache
SRC=$REPO/tests/guest

# Serialise concurrent builds of the same OUTDIR.
exec 9>"$OUT/.lock"
flock 9

# ---------------------------------------------------------------- host tools
need=()
[ -x /bin/busybox ] && dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v cpio >/dev/null || need+=(cpio)
command -v gcc >/dev/null || need+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
command -v xz >/dev/null || need+=(xz-utils)
command -v dpkg-deb >/dev/null || die "dpkg-deb missing (not a Debian host?)"
if [ ${#need[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || die "need root to install: ${need[*]}"
	say "installing ${need[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends "${need[@]}" >/dev/null ||
		{ apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; } ||
		die "apt-get install ${need[*]} failed"
fi
BUSYBOX=/bin/busybox

# ----------------------------------------------------------- kernel package
APTOPT=(-o APT::Sandbox::User=root -o Debug::NoLocking=1)
resolve_pkg() {
	apt-cache depends linux-image-amd64 2>/dev/null |
		awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
KPKG=${REMUS_GUEST_KERNEL_PKG:-}
if [ -z "$KPKG" ]; then
	KPKG=$(resolve_pkg)
	if [ -z "$KPKG" ] && ! ls "$CACHE"/linux-image-[0-9]*.deb >/dev/null 2>&1; then
		say "apt lists do not know linux-image-amd64; running apt-get update"
		apt-get update >/dev/null || true
		KPKG=$(resolve_pkg)
	fi
fi

KDEB=
if [ -n "$KPKG" ]; then
	# --print-uris names the wanted file (and prints nothing if it is
	# already present and verified in the current directory).
	uri=$(cd "$CACHE" && apt-get "${APTOPT[@]}" download --print-uris "$KPKG" 2>/dev/null | awk '{print $2}' | head -n1) || true
	if [ -n "$uri" ] && [ -s "$CACHE/$uri" ]; then
		KDEB=$CACHE/$uri
	elif [ -n "$uri" ]; then
		say "downloading $KPKG"
		(cd "$CACHE" && apt-get "${APTOPT[@]}" download "$KPKG") >/dev/null 2>&1 || {
			say "download failed; apt-get update and retry"
			apt-get update >/dev/null || true
			(cd "$CACHE" && apt-get "${APTOPT[@]}" download "$KPKG") >/dev/null
		} || die "apt-get download $KPKG failed"
		KDEB=$(ls -t "$CACHE/${KPKG}"_*.deb 2>/dev/null | head -n1)
	else
		KDEB=$(ls -t "$CACHE/${KPKG}"_*.deb 2>/dev/null | head -n1)
	fi
fi
if [ -z "$KDEB" ]; then
	# offline fallback: newest cached kernel
	KDEB=$(ls -t "$CACHE"/linux-image-[0-9]*.deb 2>/dev/null | head -n1)
fi
[ -n "$KDEB" ] && [ -s "$KDEB" ] || die "no kernel package (linux-image-amd64) available"
say "kernel package $(basename "$KDEB")"
for f in "$CACHE"/linux-image-*.deb; do # drop superseded kernels
	[ "$f" = "$KDEB" ] || rm -f "$f"
done

# ------------------------------------------------------ workloads initramfs
# OUTDIR/initrd-workloads.img = initrd.img + a second cpio.gz (see the top).
build_workloads() {
	local WX=$OUT/.workloads wstamp rdeb tdeb bin lib
	command -v redis-benchmark >/dev/null && [ -x /usr/bin/redis-check-rdb ] || {
		[ "$(id -u)" = 0 ] || die "need root to install redis-tools"
		say "installing redis-tools (its libraries resolve redis-server's ldd)"
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-tools >/dev/null ||
			{ apt-get update >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-tools >/dev/null; } ||
			die "apt-get install redis-tools failed"
	}
	# the server binary is redis-tools' redis-check-rdb (redis-server is a
	# symlink to it in the redis-server .deb; redis picks its mode by argv[0])
	for p in redis-server redis-tools; do
		ls "$CACHE/${p}"_*.deb >/dev/null 2>&1 ||
			(cd "$CACHE" && apt-get "${APTOPT[@]}" download "$p") >/dev/null 2>&1 ||
			{ apt-get update >/dev/null; (cd "$CACHE" && apt-get "${APTOPT[@]}" download "$p") >/dev/null; } ||
			die "apt-get download $p failed"
	done
	rdeb=$(ls -t "$CACHE"/redis-server_*.deb | head -n1)
	tdeb=$(ls -t "$CACHE"/redis-tools_*.deb | head -n1)
	wstamp=$( {
		basename "$rdeb"
		basename "$tdeb"
		sha256sum "${BASH_SOURCE[0]}" "$SRC/remus-batch.c" "$OUT/initrd.img" | awk '{print $1}'
	} | sha256sum | awk '{print $1}')
	if [ "${REMUS_GUEST_FORCE:-0}" != 1 ] && [ -s "$OUT/initrd-workloads.img" ] &&
		[ "$(cat "$OUT/.stamp-workloads" 2>/dev/null)" = "$wstamp" ]; then
		say "up to date: $OUT/initrd-workloads.img"
		return 0
	fi
	rm -rf "$WX"
	mkdir -p "$WX/x" "$WX/root/bin" "$WX/root/usr/bin" "$WX/root/lib64" "$WX/root/etc"
	dpkg -x "$rdeb" "$WX/x"
	dpkg -x "$tdeb" "$WX/x"
	bin=$WX/x/usr/bin/redis-check-rdb
	[ -x "$bin" ] || die "no redis-check-rdb in $(basename "$tdeb")"
	cp "$bin" "$WX/root/usr/bin/redis-server"
	# shared libraries, as ldd resolves them on this host (same Debian release)
	for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
		mkdir -p "$WX/root$(dirname "$lib")"
		cp -L "$lib" "$WX/root$lib"
	done
	ldd "$bin" | grep -q "not found" && die "redis-server: a library is missing: $(ldd "$bin" | grep "not found")"
	[ -e "$WX/root/lib64/ld-linux-x86-64.so.2" ] || cp -L /lib64/ld-linux-x86-64.so.2 "$WX/root/lib64/"
	# (copied to the paths ldd printed, /lib/x86_64-linux-gnu: one of the
	# loader's built-in search directories on Debian, so no ld.so.cache needed)
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$WX/root/etc/passwd"
	printf 'root:x:0:\n' >"$WX/root/etc/group"
	say "compiling remus-batch (static)"
	gcc -O2 -static -Wall -Wextra -Wno-unused-parameter -o "$WX/root/bin/remus-batch" "$SRC/remus-batch.c"
	strip -s "$WX/root/bin/remus-batch" "$WX/root/usr/bin/redis-server"
	(cd "$WX/root" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -n -6 >"$WX/extra.cpio.gz"
	cat "$OUT/initrd.img" "$WX/extra.cpio.gz" >"$OUT/initrd-workloads.img.tmp"
	mv -f "$OUT/initrd-workloads.img.tmp" "$OUT/initrd-workloads.img"
	echo "$wstamp" >"$OUT/.stamp-workloads"
	rm -rf "$WX"
	say "done: $OUT/initrd-workloads.img ($(stat -c %s "$OUT/initrd-workloads.img") bytes; redis-server $(basename "$tdeb" | cut -d_ -f2))"
}

# ------------------------------------------------------------------ stamp
WANT_MODS="virtio_pci virtio_net virtio_blk"
[ "${REMUS_GUEST_EXT4:-1}" = 1 ] && WANT_MODS="$WANT_MODS ext4 crc32c_generic"
STAMP=$( {
	echo "mods=$WANT_MODS"
	basename "$KDEB"
	stat -c %s "$KDEB"
	sha256sum "${BASH_SOURCE[0]}" "$SRC/init" "$SRC/remus-guest.c" "$BUSYBOX" | awk '{print $1}'
	gcc --version | head -n1
} | sha256sum | awk '{print $1}')
if [ "${REMUS_GUEST_FORCE:-0}" != 1 ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/vmlinux" ] && [ -s "$OUT/initrd.img" ] &&
	[ "$(cat "$OUT/.stamp" 2>/dev/null)" = "$STAMP" ]; then
	say "up to date: $OUT/vmlinuz $OUT/vmlinux $OUT/initrd.img"
	[ "$WORKLOADS" = 1 ] && build_workloads
	exit 0
fi

# ---------------------------------------------------------- extract kernel
# Extracted afresh for each build (a few seconds; only the .deb is cached).
KX=$OUT/.kernel
rm -rf "$KX"
mkdir -p "$KX"
say "extracting $(basename "$KDEB")"
dpkg -x "$KDEB" "$KX"
KVER=$(ls "$KX/lib/modules" | head -n1)
[ -n "$KVER" ] && [ -f "$KX/boot/vmlinuz-$KVER" ] || die "no kernel in $KDEB"
MODDIR=$KX/lib/modules/$KVER
# The .deb has no modules.dep (depmod runs at install time); make one.
[ -s "$MODDIR/modules.dep" ] || "$BUSYBOX" depmod -b "$KX" "$KVER"

# ------------------------------------------------------------ stage the root
ST=$OUT/.staging
rm -rf "$ST"
mkdir -p "$ST"/{bin,sbin,dev,proc,sys,tmp,etc,root,mnt/disk,lib/modules/"$KVER"}
cp "$BUSYBOX" "$ST/bin/busybox"
for app in $("$BUSYBOX" --list); do
	[ "$app" = busybox ] || ln -sf busybox "$ST/bin/$app"
done
# the kernel runs /sbin/modprobe to autoload modules (e.g. crypto-crc32c for ext4)
ln -sf ../bin/busybox "$ST/sbin/modprobe"
install -m 0755 "$SRC/init" "$ST/init"
: >"$ST/etc/fstab"

say "compiling remus-guest (static)"
gcc -O2 -static -Wall -Wextra -Wno-unused-parameter -o "$ST/bin/remus-guest" "$SRC/remus-guest.c"
strip -s "$ST/bin/remus-guest"

# modules plus their dependencies, resolved from modules.dep
declare -A seen=()
add_mod() { # $1: path relative to MODDIR
	local rel=$1 dep
	[ -n "${seen[$rel]:-}" ] && return 0
	seen[$rel]=1
	mkdir -p "$ST/lib/modules/$KVER/$(dirname "$rel")"
	cp "$MODDIR/$rel" "$ST/lib/modules/$KVER/$rel"
	for dep in $(awk -v m="$rel:" '$1 == m { $1 = ""; print }' "$MODDIR/modules.dep"); do
		add_mod "$dep"
	done
}
for m in $WANT_MODS; do
	rel=$(awk -v m="/$m.ko:" 'index($1, m) && substr($1, length($1) - length(m) + 1) == m { sub(":$", "", $1); print $1; exit }' "$MODDIR/modules.dep")
	[ -n "$rel" ] || die "module $m not in $KVER"
	add_mod "$rel"
done
cp "$MODDIR"/modules.builtin "$MODDIR"/modules.order "$ST/lib/modules/$KVER/" 2>/dev/null || true
"$BUSYBOX" depmod -b "$ST" "$KVER"
say "modules: ${!seen[*]}"

[ "$(id -u)" = 0 ] && mknod -m 600 "$ST/dev/console" c 5 1 2>/dev/null || true

# ---------------------------------------------------------------- archives
say "packing initrd.img"
(cd "$ST" && find . -mindepth 1 | LC_ALL=C sort |
	cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -n -6 >"$OUT/initrd.img.tmp"
cp "$KX/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp"

# Uncompressed ELF for PVH boot: the bzImage payload is one xz stream.
say "extracting vmlinux (PVH ELF) from the bzImage"
rm -f "$OUT/vmlinux.tmp"
for off in $(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$OUT/vmlinuz.tmp" | cut -d: -f1); do
	tail -c +$((off + 1)) "$OUT/vmlinuz.tmp" | xz -dc --single-stream >"$OUT/vmlinux.tmp" 2>/dev/null || true
	[ "$(head -c 4 "$OUT/vmlinux.tmp" 2>/dev/null | od -An -tx1 | tr -d ' ')" = 7f454c46 ] && break
	rm -f "$OUT/vmlinux.tmp"
done
[ -s "$OUT/vmlinux.tmp" ] || die "could not extract vmlinux from the bzImage"
if command -v readelf >/dev/null && ! readelf -n "$OUT/vmlinux.tmp" | grep -q "Unknown note type: (0x00000012)"; then
	say "warning: vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); use vmlinuz"
fi
mv -f "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv -f "$OUT/vmlinux.tmp" "$OUT/vmlinux"
mv -f "$OUT/initrd.img.tmp" "$OUT/initrd.img"
echo "$KVER" >"$OUT/kernel-version"
echo "$STAMP" >"$OUT/.stamp"
rm -rf "$ST" "$KX"
rm -rf "$CACHE"/x-* # extraction cache of older versions of this script
say "done: $OUT/vmlinuz $OUT/vmlinux ($KVER) $OUT/initrd.img ($(stat -c %s "$OUT/initrd.img") bytes)"
[ "$WORKLOADS" = 1 ] && build_workloads
exit 0
