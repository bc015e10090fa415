#!/usr/bin/env bash
# Builds ferrite-storage-daemon and runs it on a built-in default: a QMP monitor on a unix
# socket, a second one on TCP, a throttle group, a secret and a ring-buffer chardev to play
# with. Prints how to connect; stops on Ctrl-C (or the QMP command `quit`).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
cargo build --release --locked -q
dir=${FERRITE_DEMO_DIR:-$(mktemp -d /tmp/ferrite-demo.XXXXXX)}
sock="$dir/qmp.sock"
port=${FERRITE_DEMO_PORT:-4444}
cat <<MSG
ferrite-storage-daemon demo in $dir
  QMP (unix):  $sock
  QMP (tcp):   127.0.0.1:$port
Connect with QEMU's own client:
  python3 -m venv .venv && .venv/bin/pip install qemu.qmp   # once (scripts/setup.sh does this)
  .venv/bin/qmp-shell $sock
  (qemu) query-version
  (qemu) qom-get path=/objects/tg0 property=limits
  (qemu) ringbuf-write device=log0 data=hello
  (qemu) ringbuf-read device=log0 size=100
  (qemu) quit
or raw:  socat - UNIX-CONNECT:$sock   then type {"execute":"qmp_capabilities"}
MSG
exec target/release/ferrite-storage-daemon \
  --chardev "socket,id=qmp0,path=$sock,server=on,wait=off" --monitor qmp0 \
  --chardev "socket,id=qmp1,host=127.0.0.1,port=$port,server=on,wait=off" --monitor qmp1,pretty=on \
  --object throttle-group,id=tg0,limits.iops-total=1000,limits.bps-total=104857600 \
  --object secret,id=sec0,data=demo-secret \
  --chardev ringbuf,id=log0,size=4096 \
  --pidfile "$dir/ferrite.pid"
