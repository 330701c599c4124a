#!/usr/bin/env bash
# Install Debian's libvirt daemon (QEMU driver) and virsh, used only to (re)make
# the libvirt save-image fixtures under tests/data/containers/. The unit tests do
# not need it: they read the committed fixtures.
#
# Packages come from the machine's configured Debian archive (no host is named
# here). Debian 12 ships libvirt 9.0; it drives the QEMU 10 from backports that
# ci/install-qemu.sh installs.
set -euo pipefail
ensure_qemu_user() {
  # libvirt 9.0 looks up its compiled-in default QEMU user (libvirt-qemu) before
  # it reads qemu.conf, so the user must exist even when qemu.conf says root.
  # libvirt-daemon-system would create it; that package is not installed here.
  getent group kvm >/dev/null || groupadd -r kvm
  getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
  getent passwd libvirt-qemu >/dev/null ||
    useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
}
if command -v libvirtd >/dev/null 2>&1 && command -v virsh >/dev/null 2>&1; then
  ensure_qemu_user
  echo "ci/install-libvirt.sh: $(libvirtd --version) already present"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# --no-install-recommends keeps out dnsmasq, iptables, polkit, etc. The daemon
# is started by hand with a private config (see make_container_fixtures.py), so
# neither systemd units nor the default network are needed.
apt-get install -y -qq --no-install-recommends \
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients >/dev/null
# Compressors that libvirt runs for save_image_format (gzip is always there).
apt-get install -y -qq --no-install-recommends xz-utils bzip2 lzop zstd >/dev/null || true
ensure_qemu_user
libvirtd --version
