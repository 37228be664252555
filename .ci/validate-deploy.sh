#!/usr/bin/env bash
# CI: check the deploy files and the Vagrant cluster without booting VMs
# (this machine has no usable hardware virtualisation).
#   1. vagrant validate with the libvirt and the VirtualBox provider; the
#      node count (FERRY_NODES) reaches the cluster description file.
#   2. shellcheck on every shell script under deploy/ and vagrant/.
#   3. systemd-analyze verify on deploy/systemd/*.service (a parse check of
#      sections and keys where systemd-analyze is missing).
#   4. the Docker plugin's config.json is valid JSON.
# Installs vagrant, vagrant-libvirt and shellcheck from Debian when missing.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
started=$(date +%s)
work="$(mktemp -d /tmp/vg-validate.XXXXXX)"
trap 'rm -rf "$work"' EXIT

missing=()
command -v vagrant >/dev/null || missing+=(vagrant)
dpkg-query -W -f='${Status}' vagrant-libvirt 2>/dev/null | grep -q 'install ok installed' || missing+=(vagrant-libvirt)
command -v shellcheck >/dev/null || missing+=(shellcheck)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "== installing ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    # No recommends: they would remove fuse, which zfs-fuse needs.
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${missing[@]}"
fi

echo "== vagrant validate"
# A copy, so the checkout's vagrant/cluster.yaml and .vagrant/ stay untouched;
# ".." of the copy stands in for the repository (the synced folder).
mkdir -p "$work/repo"
cp -r "$repo/vagrant" "$work/repo/vagrant"
rm -rf "$work/repo/vagrant/.vagrant" "$work/repo/vagrant/cluster.yaml" "$work/repo/vagrant/.certs"
vagrant_dir="$work/repo/vagrant"
export VAGRANT_HOME="$work/vagrant-home"

(cd "$vagrant_dir" && VAGRANT_DEFAULT_PROVIDER=libvirt vagrant validate)
echo "libvirt provider: ok"

vbox_path="$PATH"
if ! command -v VBoxManage >/dev/null; then
    # VirtualBox is not packaged in Debian. vagrant validate asks VBoxManage only
    # for its version; this stand-in answers that and nothing else, so the
    # VirtualBox part of the Vagrantfile is still checked.
    mkdir -p "$work/vbox"
    cat > "$work/vbox/VBoxManage" <<'SH'
#!/bin/sh
[ "$1" = --version ] && echo 7.0.14r161095 && exit 0
echo "VBoxManage stand-in: only --version" >&2
exit 1
SH
    chmod +x "$work/vbox/VBoxManage"
    vbox_path="$work/vbox:$PATH"
    echo "(VirtualBox not installed: VBoxManage stand-in answers --version only)"
fi
(cd "$vagrant_dir" && PATH="$vbox_path" VAGRANT_DEFAULT_PROVIDER=virtualbox vagrant validate)
echo "virtualbox provider: ok"

for count in 1 5; do
    (cd "$vagrant_dir" && FERRY_NODES=$count VAGRANT_DEFAULT_PROVIDER=libvirt vagrant validate >/dev/null)
    hosts=$(grep -c '^- name: node' "$vagrant_dir/cluster.yaml")
    if [ "$hosts" -ne "$count" ]; then
        echo "FERRY_NODES=$count gave $hosts hosts in cluster.yaml" >&2
        exit 1
    fi
    echo "FERRY_NODES=$count: cluster.yaml describes $hosts nodes"
done
refusal="$(cd "$vagrant_dir"; FERRY_NODES=0 vagrant validate 2>&1 || true)"
if ! grep -q 'FERRY_NODES="0": give a whole number' <<< "$refusal"; then
    printf 'FERRY_NODES=0 was not refused with the expected message:\n%s\n' "$refusal" >&2
    exit 1
fi
echo "FERRY_NODES=0: refused"

echo "== shellcheck"
scripts=()
while IFS= read -r -d '' file; do
    if head -n1 "$file" | grep -Eq '^#!.*([/ ]|^#!)(ba)?sh( |$)'; then
        scripts+=("$file")
    fi
done < <(find "$repo/deploy" "$repo/vagrant" -type f -not -path '*/.vagrant/*' -print0)
shellcheck -x "${scripts[@]}"
printf '%s\n' "${scripts[@]#"$repo/"}"

echo "== systemd units"
units=("$repo"/deploy/systemd/*.service)
if command -v systemd-analyze >/dev/null; then
    # verify also checks that each ExecStart binary exists: deploy/install.sh makes them.
    output="$(systemd-analyze verify "${units[@]}" 2>&1)"
    if [ -n "$output" ]; then
        printf '%s\n' "$output" >&2
        exit 1
    fi
    echo "systemd-analyze verify: ${#units[@]} units, no warnings"
else
    # Parse check: each unit has [Unit], [Service] with ExecStart= and Restart=, [Install].
    python3 - "${units[@]}" <<'PY'
import configparser, sys
for path in sys.argv[1:]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(path)
    for section, key in [("Unit", "Description"), ("Service", "ExecStart"), ("Service", "Restart"), ("Install", "WantedBy")]:
        if not parser.has_option(section, key):
            sys.exit(f"{path}: [{section}] has no {key}=")
print(f"parse check (no systemd-analyze): {len(sys.argv) - 1} units")
PY
fi

echo "== docker plugin config"
python3 -m json.tool "$repo/deploy/docker-plugin/config.json" >/dev/null
echo "config.json: valid JSON"

echo "== validate-deploy finished in $(( $(date +%s) - started )) s"
