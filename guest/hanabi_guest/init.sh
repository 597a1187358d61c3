#!/bin/sh
# hanabi guest /init (busybox sh, run by the kernel from the initramfs via rdinit=/init).
# Mounts the pseudo filesystems, starts loading the kernel modules listed in
# /etc/hanabi/modules (dependency order, computed by the image builder) in the background,
# and execs the agent as PID 1 right away: Python's cold start (~1.4 s under TCG) then
# overlaps module loading on a second vCPU. The agent waits for the devices it needs
# (virtio-serial port, disks) and reaps the loader when it ends.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
(
    while read -r m; do
        insmod "$m" || echo "hanabi-init: insmod $m failed" >&2
    done </etc/hanabi/modules
) &
exec /usr/bin/python3.11 -I -S -B -c 'import sys; sys.path.insert(0, "/usr/lib/hanabi"); from hanabi_guest.agent import main; main()'
