#!/usr/bin/env bash
# Installs what the VM tests (integration/vm) need on the host: QEMU, and
# the tools the harness copies into the guest's initramfs with their shared
# libraries. The guest kernel is not installed here: the harness fetches
# it with `apt-get download` into ~/.cache/nbdvault/vm and unpacks it
# there, so the host's boot files are never touched. Idempotent: fast when
# all is there. scripts/deps.sh runs it; see docs/vm.md.
set -euo pipefail

# qemu-system-x86: runs the guest (TCG). The rest end up in the guest:
# busybox-static (the shell, modprobe, dd, sha256sum…), nbd-client, mdadm,
# lvm2 (lvm, dmsetup), socat, e2fsprogs (mkfs.ext4, e2fsck), util-linux
# (blkid, fsfreeze). cpio for looking into an initramfs by hand.
VM_PACKAGES=(qemu-system-x86 busybox-static nbd-client mdadm lvm2 dmsetup socat e2fsprogs util-linux cpio)

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo

need=()
for pkg in "${VM_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done

# The harness asks apt which kernel linux-image-amd64 points at; that needs
# package lists.
apt_ready=true
apt-cache show linux-image-amd64 >/dev/null 2>&1 || apt_ready=false

if [ ${#need[@]} -gt 0 ] || ! $apt_ready; then
  $sudo apt-get update -qq
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "vm-deps: installing Debian packages: ${need[*]}"
  # mdadm, lvm2, dmeventd, udev and nbd-client ship services whose
  # postinst starts them (mdadm --monitor, dmeventd, lvmpolld, udevd) where
  # systemd is not running. The host needs none of them: a policy-rc.d
  # that answers 101 makes invoke-rc.d and deb-systemd-invoke start
  # nothing. We add one only for this install, and only if the machine has
  # none of its own. --no-install-recommends keeps out mdadm's mail server
  # and QEMU's GUI.
  policy=/usr/sbin/policy-rc.d
  added_policy=false
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# added by nbdvault scripts/vm-deps.sh during apt-get install\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod 755 "$policy"
    added_policy=true
  fi
  status=0
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" || status=$?
  if $added_policy; then
    $sudo rm -f "$policy"
  fi
  if [ $status -ne 0 ]; then
    echo "vm-deps: apt-get install ${need[*]} failed" >&2
    exit $status
  fi
fi
