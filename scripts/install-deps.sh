#!/usr/bin/env bash
# Installs every package remus needs from Debian 12's archive, and enables
# deb-src for bookworm and trixie and the bookworm-backports archive
# (scripts/build-qemu.sh builds the test QEMUs from Debian 12's and Debian
# 13's source packages).
# Idempotent: does nothing when everything is present. Needs root.
set -euo pipefail

PKGS=(
  # build
  build-essential cmake ninja-build pkg-config
  # scripts/check-thread-safety.sh: clang's -Wthread-safety over the sources;
  # scripts/sanitize.sh: clang's ASan/UBSan/TSan builds (runtimes: libclang-rt-dev,
  # the default clang's: 14 on Debian 12, 19 on Debian 13)
  clang libclang-rt-dev
  # libraries
  libgtest-dev libgmock-dev nlohmann-json3-dev libcli11-dev libssl-dev liblz4-dev
  liburing-dev libnl-route-3-dev libnetfilter-queue-dev libmnl-dev libvirt-dev libxml2-dev
  # CRC-32C on frames and journal records (common/crc32c.h)
  libisal-dev
  # per-page XXH3-128 hashes for the delta resync (replicator/link/page_hash.h)
  libxxhash-dev
  # arbiter/etcd_http.h: etcd's JSON gateway over libcurl
  libcurl4-openssl-dev
  # remusd --metrics: Prometheus text format (prometheus-cpp core) over civetweb
  prometheus-cpp-dev libcivetweb-dev
  # remusd --metrics-web-config: its YAML (yaml-cpp); bcrypt hashes through libxcrypt
  libyaml-cpp-dev libcrypt-dev
  # the hypervisor and tools the tests drive
  qemu-system-x86 qemu-utils socat iproute2 iptables
  # the test guest (scripts/build-guest.sh)
  busybox-static cpio
  # QEMU source build (scripts/build-qemu.sh)
  dpkg-dev meson libglib2.0-dev libpixman-1-dev zlib1g-dev flex bison libfdt-dev libslirp-dev
  # end-to-end tests
  python3 python3-pytest python3-cryptography
  # test_qemu_colo_timer.py holds QEMU threads with gdb to force a race
  gdb
  # arbiter tests start their own etcd clusters (/usr/bin/etcd); etcdctl for debugging them
  etcd-server etcd-client
  # NBD clients for diskmirror's interoperability tests (nbdinfo, nbdcopy)
  libnbd-bin
  # libvirt mode's tests: a private libvirtd per simulated host (tests/e2e/libvirt_world.py).
  # Not libvirt-daemon-system: it pulls in systemd as init; the worlds need only the daemon.
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
)

log() { printf '[install-deps] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "must run as root (it installs packages with apt-get)"; exit 1
fi

# has_source TYPE SUITE: whether apt already has a TYPE ("deb" or "deb-src")
# entry for SUITE, one-line (.list) or deb822 (.sources) style.
has_source() {
  local type=$1 suite=$2
  grep -hqsE "^${type}( +\[[^]]*\])? +[^ ]+ +${suite}( |$)" /etc/apt/sources.list /etc/apt/sources.list.d/*.list && return 0
  awk -v t="$type" -v s="$suite" '
    BEGIN { RS = ""; found = 0 }
    { types = 0; suites = 0; n = split($0, line, "\n")
      for (i = 1; i <= n; i++) {
        if (line[i] ~ /^Types:/ && (" " substr(line[i], 7) " ") ~ (" " t " ")) types = 1
        if (line[i] ~ /^Suites:/ && (" " substr(line[i], 8) " ") ~ (" " s " ")) suites = 1
      }
      if (types && suites) found = 1 }
    END { exit !found }' /etc/apt/sources.list.d/*.sources 2>/dev/null
}
# add_source FILE TYPE SUITES WHY: a deb822 entry of ours, unless apt has one.
add_source() {
  local file=$1 type=$2 suites=$3 why=$4
  has_source "$type" "${suites%% *}" && return 0
  log "enabling $type for $suites ($why) in $file"
  printf 'Types: %s\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: %s\n' \
    "$type" "$suites" /usr/share/keyrings/debian-archive-keyring.gpg > "$file"
  need_update=1
}
need_update=0
add_source /etc/apt/sources.list.d/remus-debian-src.sources deb-src "bookworm bookworm-updates" \
  "Debian 12's QEMU source, scripts/build-qemu.sh 7.2"
# The second test QEMU is Debian 13's (scripts/build-qemu.sh 10.0): its
# source only (deb-src: no trixie binary package can be installed from it),
# and bookworm-backports for the meson 1.7 it needs, which build-qemu.sh
# downloads and unpacks for that build alone (backports' pin priority 100
# keeps every installed package on bookworm's versions).
add_source /etc/apt/sources.list.d/remus-trixie-src.sources deb-src "trixie trixie-updates" \
  "Debian 13's QEMU source, scripts/build-qemu.sh 10.0"
add_source /etc/apt/sources.list.d/remus-bookworm-backports.sources deb "bookworm-backports" \
  "meson for the QEMU 10.0 build"

# Debian's etcd-server starts a system etcd on 127.0.0.1:2379/2380 at install.
# The tests start their own clusters, and a remus node must not talk to an
# accidental local etcd, so the packaged service is stopped and disabled:
# with systemd as init through systemctl; without it (containers), through
# the SysV script if that etcd happens to run. Never fatal.
stop_packaged_etcd() {
  if [ -d /run/systemd/system ]; then
    if systemctl is-enabled --quiet etcd.service 2>/dev/null || systemctl is-active --quiet etcd.service 2>/dev/null; then
      log "stopping and disabling Debian's etcd.service (tests run their own etcd)"
      systemctl disable --now etcd.service >/dev/null 2>&1 || log "warning: could not disable etcd.service"
    fi
  elif [ -x /etc/init.d/etcd ] && /etc/init.d/etcd status >/dev/null 2>&1; then
    log "stopping Debian's etcd (/etc/init.d/etcd; tests run their own etcd)"
    /etc/init.d/etcd stop >/dev/null 2>&1 || log "warning: could not stop /etc/init.d/etcd"
    update-rc.d etcd disable >/dev/null 2>&1 || true
  fi
}

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ] && [ $need_update = 0 ]; then
  stop_packaged_etcd
  log "all packages present"; exit 0
fi
export DEBIAN_FRONTEND=noninteractive
log "apt-get update"
apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
stop_packaged_etcd
log "done"
