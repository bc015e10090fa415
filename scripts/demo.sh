#!/usr/bin/env bash
# Builds ferrite-storage-daemon and runs it on a built-in default: a 1 GiB demo disk image
# (raw, sparse) exported over NBD, QMP monitors on a unix socket and on TCP, a throttle group
# and a ring-buffer chardev to play with. Prints how to connect; stops on Ctrl-C (or `quit`).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
cargo build --release --locked -q
dir=${FERRITE_DEMO_DIR:-$(mktemp -d /tmp/ferrite-demo.XXXXXX)}
mkdir -p "$dir"
img="$dir/demo.raw"
[ -e "$img" ] || truncate -s 1G "$img"
sock="$dir/qmp.sock"
nbd="$dir/nbd.sock"
port=${FERRITE_DEMO_PORT:-4444}
cat <<MSG
ferrite-storage-daemon demo in $dir
  disk image:  $img (1 GiB, raw)
  NBD export:  nbd+unix:///disk0?socket=$nbd   (writable)
  QMP (unix):  $sock
  QMP (tcp):   127.0.0.1:$port (pretty)
Try:
  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' 'nbd+unix:///disk0?socket=$nbd'
  nbdinfo --map 'nbd+unix:///disk0?socket=$nbd'
  .venv/bin/qmp-shell $sock      # after scripts/setup.sh; then for example:
    query-named-block-nodes
    query-block-exports
    qom-get path=/objects/tg0 property=limits
    quit
MSG
exec target/release/ferrite-storage-daemon \
  --blockdev "driver=file,node-name=file0,filename=$img" \
  --blockdev raw,node-name=disk0,file=file0 \
  --nbd-server "addr.type=unix,addr.path=$nbd" \
  --export type=nbd,id=export0,node-name=disk0,writable=on \
  --chardev "socket,id=qmp0,path=$sock,server=on,wait=off" --monitor qmp0 \
  --chardev "socket,id=qmp1,host=127.0.0.1,port=$port,server=on,wait=off" --monitor qmp1,pretty=on \
  --object throttle-group,id=tg0,limits.iops-total=1000,limits.bps-total=104857600 \
  --chardev ringbuf,id=log0,size=4096 \
  --pidfile "$dir/ferrite.pid"
