#!/usr/bin/env bash
# Runs every benchmark against ferrite and qemu-storage-daemon in the same run; prints ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q
python3 bench/qmp.py
python3 bench/nbd_fio.py
python3 bench/nbd_client_fio.py
python3 bench/nbd_tls_fio.py
python3 bench/http_fio.py
python3 bench/ssh_fio.py
python3 bench/qcow2_fio.py
python3 bench/luks_fio.py
python3 bench/image_formats.py
python3 bench/backup.py
python3 bench/blockjobs.py
python3 bench/vvfat.py
python3 bench/iscsi_fio.py
python3 bench/nfs_fio.py
python3 bench/fuse.py
python3 bench/vhost_user_blk.py
