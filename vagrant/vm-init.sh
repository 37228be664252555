#!/bin/sh
# PID 1 of a test guest (kernel command line init=/usr/local/sbin/ferry-vm-init),
# copied into the image by vagrant/build-image.sh.
#
# Mounts the repository (9p tag "repo", read-only, at /srv/ferry) and the
# results directory (9p tag "out", at /srv/out), runs the repository's
# vagrant/vm-guest.sh with the words of /srv/out/args, writes its exit status
# to /srv/out/rc and powers the guest off. No systemd, no network: the
# guest has only the loopback interface. The job lives in the repository, not
# here, so changing what runs in the guest needs no new image.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
export PATH HOME

mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -o remount,rw /
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
hostname ferry-vm
ip link set lo up
modprobe 9pnet_virtio
modprobe 9p
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro repo /srv/ferry
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out /srv/out

if [ -x /srv/ferry/vagrant/vm-guest.sh ] && [ -r /srv/out/args ]; then
    # shellcheck disable=SC2046  # the words of the args file are the job's arguments
    /srv/ferry/vagrant/vm-guest.sh $(cat /srv/out/args)
    echo "$?" >/srv/out/rc
else
    echo "ferry-vm-init: no /srv/ferry/vagrant/vm-guest.sh or /srv/out/args: is the repository shared as 9p tag 'repo' and the results as 'out'?"
    echo 2 >/srv/out/rc
fi
sync
umount /srv/out
echo o >/proc/sysrq-trigger
sleep 60
