#!/bin/sh
# hanabi guest /init (busybox sh, run by the kernel from the initramfs via rdinit=/init).
# Mounts the pseudo filesystems, loads the kernel modules listed in /etc/hanabi/modules
# (dependency order, computed by the image builder), then execs the agent as PID 1.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
while read -r m; do
    insmod "$m" || echo "hanabi-init: insmod $m failed" >&2
done </etc/hanabi/modules
exec /usr/bin/python3.11 -I -S -B -c 'import sys; sys.path.insert(0, "/usr/lib/hanabi"); from hanabi_guest.agent import main; main()'
