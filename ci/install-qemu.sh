#!/usr/bin/env bash
# Install QEMU 10 (qemu-system-x86, qemu-utils) from the Debian backports suite.
# The backports suite is added to the machine's existing Debian entry, so no
# package host is named here: whatever mirror the machine uses is kept.
set -euo pipefail
if command -v qemu-system-x86_64 >/dev/null 2>&1 &&
   qemu-system-x86_64 --version | grep -qE 'version (9\.[1-9]|[1-9][0-9]+\.)'; then
  echo "ci/install-qemu.sh: $(qemu-system-x86_64 --version | head -1) already present"
  exit 0
fi
src=/etc/apt/sources.list.d/debian.sources
if [ -f "$src" ]; then
  if ! grep -q 'bookworm-backports' "$src"; then
    # Only the main archive's entry (the one listing plain "bookworm").
    sed -i -E '/^Suites:.*\bbookworm\b( |$)/{/bookworm-backports/!s/$/ bookworm-backports/}' "$src"
  fi
elif [ -f /etc/apt/sources.list ] && ! grep -q bookworm-backports /etc/apt/sources.list; then
  line=$(grep -E '^deb .* bookworm main' /etc/apt/sources.list | head -1)
  echo "${line/ bookworm / bookworm-backports }" >> /etc/apt/sources.list
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq -t bookworm-backports --no-install-recommends \
  qemu-system-x86 qemu-utils >/dev/null
apt-get install -y -qq --no-install-recommends nasm >/dev/null || true
qemu-system-x86_64 --version | head -1
