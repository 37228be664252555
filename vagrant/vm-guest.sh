#!/usr/bin/env bash
# The test job inside a kernel-OpenZFS guest (run by the guest's PID 1,
# vagrant/vm-init.sh, from the repository shared read-only at /srv/ferry).
#
#   vm-guest.sh PYTEST-ARGS...
#
# Loads the zfs module, proves both ZFS backends are there (libzfs_core is the
# default where /dev/zfs exists), then runs pytest on the shared repository
# with a junit report in /srv/out/junit.xml; pytest's output goes to the
# console, which the host prints. Exit status: pytest's, or 3 when kernel ZFS
# is not usable.
set -uo pipefail
repo=/srv/ferry
venv=/opt/ferry/venv
cd "$repo" || exit 3
export PYTHONPATH="$repo" PYTHONDONTWRITEBYTECODE=1

echo "vm-guest: kernel $(uname -r)"
if ! timeout 120 modprobe zfs; then
    echo "vm-guest: modprobe zfs failed: the image's zfs.ko does not load (rebuild with vagrant/build-image.sh)"
    exit 3
fi
echo "vm-guest: $(cat /sys/module/zfs/version 2>/dev/null || echo 'zfs version unknown')"
backend=$("$venv/bin/python" -c 'import agent.zfs; print(agent.zfs.backend_name())') || exit 3
echo "vm-guest: default ZFS backend $backend"
if [ "$backend" != libzfs_core ]; then
    echo "vm-guest: the libzfs_core backend is not picked although /dev/zfs exists (is python3-pyzfs in the venv's path?)"
    exit 3
fi
"$venv/bin/python" -m pytest -p no:cacheprovider --color=no -rs --junitxml=/srv/out/junit.xml "$@"
