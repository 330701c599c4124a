#!/usr/bin/env bash
# Reserve hugepages and mount hugetlbfs for the hugepage-backed integration tests.
#
#   sudo ci/setup-hugepages.sh            # 512 x 2 MiB, 2 x 1 GiB
#   HUGEPAGES_2M=256 HUGEPAGES_1G=0 ci/setup-hugepages.sh
#
# Mounts (the test harness looks for exactly these):
#   /dev/hugepages-2M   hugetlbfs, pagesize=2M
#   /dev/hugepages-1G   hugetlbfs, pagesize=1G
#
# Idempotent: an existing reservation is only ever raised, never lowered, and
# mounts that are already in place are left alone. 1 GiB pages are best effort:
# the kernel may be unable to find enough contiguous memory at runtime; the
# script reports how many it got and still succeeds (exit 0) as long as the
# 2 MiB reservation and both mounts worked. Exit status 1 means a required step
# failed (not root, no hugetlbfs support, 2 MiB reservation short, mount error).
set -uo pipefail

want_2m=${HUGEPAGES_2M:-512}
want_1g=${HUGEPAGES_1G:-2}
mnt_2m=${HUGEPAGES_2M_MOUNT:-/dev/hugepages-2M}
mnt_1g=${HUGEPAGES_1G_MOUNT:-/dev/hugepages-1G}
sys=/sys/kernel/mm/hugepages
status=0

say() { echo "setup-hugepages: $*"; }

if [ "$(id -u)" != 0 ]; then
  say "must run as root (writes $sys/*/nr_hugepages and mounts hugetlbfs)"
  exit 1
fi
if ! grep -qw hugetlbfs /proc/filesystems; then
  say "kernel has no hugetlbfs support (not listed in /proc/filesystems)"
  exit 1
fi

# reserve KIND_DIR WANT LABEL -> prints the count it ended with
reserve() {
  local dir=$1 want=$2 label=$3 have got
  if [ ! -d "$sys/$dir" ]; then
    say "$label pages: not supported by this kernel/CPU ($sys/$dir missing)"
    echo 0 >&3
    return 1
  fi
  have=$(cat "$sys/$dir/nr_hugepages")
  if [ "$have" -ge "$want" ]; then
    say "$label pages: $have already reserved (wanted >= $want), unchanged"
    echo "$have" >&3
    return 0
  fi
  # Drop clean caches first: it helps the kernel find contiguous memory.
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  if [ "$dir" = hugepages-1048576kB ]; then
    echo 1 > /proc/sys/vm/compact_memory 2>/dev/null || true
  fi
  if ! echo "$want" > "$sys/$dir/nr_hugepages" 2>/dev/null; then
    say "$label pages: writing $want to $sys/$dir/nr_hugepages failed"
  fi
  got=$(cat "$sys/$dir/nr_hugepages")
  say "$label pages: reserved $got (was $have, wanted $want)"
  echo "$got" >&3
  [ "$got" -ge "$want" ]
}

# mount_hugetlbfs DIR PAGESIZE
mount_hugetlbfs() {
  local dir=$1 size=$2 line
  line=$(awk -v d="$dir" '$2 == d && $3 == "hugetlbfs"' /proc/mounts | tail -1)
  if [ -n "$line" ]; then
    say "$dir: already mounted ($line)"
    return 0
  fi
  mkdir -p "$dir"
  if mount -t hugetlbfs -o "pagesize=$size" none "$dir"; then
    say "$dir: mounted hugetlbfs pagesize=$size"
  else
    say "$dir: mount -t hugetlbfs -o pagesize=$size failed"
    return 1
  fi
}

exec 4>&1
got_2m=$( { reserve hugepages-2048kB "$want_2m" "2 MiB" 3>&1 1>&4; } | tail -1 )
[ "${got_2m:-0}" -ge "$want_2m" ] || status=1
got_1g=0
if [ "$want_1g" -gt 0 ]; then
  got_1g=$( { reserve hugepages-1048576kB "$want_1g" "1 GiB" 3>&1 1>&4; } | tail -1 )
fi

mount_hugetlbfs "$mnt_2m" 2M || status=1
if [ -d "$sys/hugepages-1048576kB" ]; then
  mount_hugetlbfs "$mnt_1g" 1G || status=1
else
  say "$mnt_1g: not mounted (no 1 GiB page support)"
fi

for d in hugepages-2048kB hugepages-1048576kB; do
  [ -d "$sys/$d" ] || continue
  say "summary $d: nr=$(cat $sys/$d/nr_hugepages) free=$(cat $sys/$d/free_hugepages)"
done
if [ "$want_1g" -gt 0 ] && [ "${got_1g:-0}" -lt "$want_1g" ]; then
  say "note: only ${got_1g:-0} of $want_1g 1 GiB pages could be reserved; 1 GiB tests need them"
fi
exit $status
