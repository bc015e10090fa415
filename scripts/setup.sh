#!/usr/bin/env bash
# Installs what ferrite's tests need on a fresh machine of the project's kind (Debian 12, root):
# the QEMU 10.0.2 tools, qemu-system-x86_64 and qemu-block-extra (the oracles), libnbd tools, nbdkit, fio, xfsprogs, mtools, tgt, nfs-ganesha, rpcbind, and a Python venv
# with qemu.qmp.
# Idempotent: what is already there is not installed again. Names no hosts: the backports suite
# is derived from the machine's own apt sources (reference/dependencies.md §7).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)

need_apt=()
qemu_ok() { qemu-storage-daemon --version 2>/dev/null | grep -q 'version 10\.0\.'; }
qemu_ok || need_apt+=(qemu-utils)
# qemu-system-x86_64 10.0 is the oracle of ferrite-system-x86_64 (run with -accel tcg -S).
system_ok() { qemu-system-x86_64 --version 2>/dev/null | grep -q 'version 10\.0\.'; }
system_ok || need_apt+=(qemu-system-x86)
# qemu-storage-daemon's http/https drivers (libcurl) are a module of qemu-block-extra: the
# oracle of ferrite's.
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-curl.so ] || need_apt+=(qemu-block-extra)
command -v nbdinfo >/dev/null || need_apt+=(libnbd-bin)
command -v nbdkit >/dev/null || need_apt+=(nbdkit)
command -v fio >/dev/null || need_apt+=(fio)
# certtool makes the certificates of the NBD-over-TLS tests (as QEMU's iotests make theirs).
command -v certtool >/dev/null || need_apt+=(gnutls-bin)
# XFS takes non-blocking buffered writes (ext4 does not): the write-path tests mount one.
command -v mkfs.xfs >/dev/null || need_apt+=(xfsprogs)
[ -e /usr/lib/python3/dist-packages/nbd.py ] || need_apt+=(python3-libnbd)
# The ssh driver's tests (and qsd's, the oracle) talk to OpenSSH's sshd.
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
# mtools is the guest file system the vvfat tests write with (through a FUSE export).
command -v mcopy >/dev/null || need_apt+=(mtools)
# tgt is the iSCSI target the iscsi driver's tests (and qsd's, the oracle) log in to.
[ -x /usr/sbin/tgtd ] || need_apt+=(tgt)
# nfs-ganesha (user-space NFS server, its VFS back end) and rpcbind serve the nfs driver's
# tests (and qsd's, the oracle) an export.
[ -x /usr/bin/ganesha.nfsd ] && [ -e /usr/lib/x86_64-linux-gnu/ganesha/libfsalvfs.so ] \
  || need_apt+=(nfs-ganesha nfs-ganesha-vfs)
[ -x /usr/sbin/rpcbind ] || need_apt+=(rpcbind)
# The http bench's web server (the tests bring their own, in Python).
command -v nginx >/dev/null || need_apt+=(nginx-light)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  if [ ! -e /etc/apt/sources.list.d/backports.sources ] && [ -e /etc/apt/sources.list.d/debian.sources ]; then
    awk 'BEGIN{RS="";ORS="\n"} NR==1' /etc/apt/sources.list.d/debian.sources \
      | sed 's/^Suites:.*/Suites: bookworm-backports/' | $SUDO tee /etc/apt/sources.list.d/backports.sources >/dev/null
  fi
  $SUDO apt-get update -qq
  # The QEMU packages must come from backports (10.0.2); plain bookworm's 7.2 is not the oracle.
  backports=()
  rest=()
  for p in "${need_apt[@]}"; do
    case "$p" in qemu-utils|qemu-system-x86|qemu-block-extra) backports+=("$p") ;; *) rest+=("$p") ;; esac
  done
  if [ ${#backports[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports "${backports[@]}"
  fi
  if [ ${#rest[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${rest[@]}"
  fi
fi
qemu_ok || { echo "setup: qemu-storage-daemon 10.0.x is required as the test oracle" >&2; exit 1; }

# The style checks need clippy and rustfmt next to cargo.
for tool in clippy fmt; do
  if ! cargo "$tool" --version >/dev/null 2>&1; then
    command -v rustup >/dev/null && rustup component add "$([ $tool = fmt ] && echo rustfmt || echo clippy)"
    cargo "$tool" --version >/dev/null 2>&1 || { echo "setup: cargo $tool is required for the style checks" >&2; exit 1; }
  fi
done

venv="$top/.venv"
if ! "$venv/bin/python" -c 'import qemu.qmp, pytest, pytest_timeout, xdist' 2>/dev/null; then
  echo "setup: creating Python venv with qemu.qmp, pytest, pytest-timeout and pytest-xdist"
  python3 -m venv "$venv"
  # pytest-timeout: a test that hangs fails alone (with every thread's stack) instead of
  # eating the whole run's time. pytest-xdist: the suite runs in two processes (most of
  # its time is spent waiting on daemons and clients, not on the CPU).
  "$venv/bin/pip" install -q 'qemu.qmp==0.0.6' 'pytest>=8,<9' 'pytest-timeout>=2.3,<3' \
    'pytest-xdist>=3.5,<4'
fi
echo "setup: done"
