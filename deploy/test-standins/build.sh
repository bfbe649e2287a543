#!/usr/bin/env bash
# Builds the TEST STAND-INS of the official base images our compose stack uses, from Debian packages, for
# machines that reach Debian's mirror but no container registry (this one, its CI). Usage:
#
#   build.sh [--force] python=python:3.11-slim redis=redis:7-alpine postgres=postgres:16-alpine
#
# Each KIND=NAME builds <KIND>/Containerfile and tags it NAME, unless NAME exists already: a stand-in of an
# earlier run (kept as a cache, labelled org.waifu.test-standin) or the real image on a machine that could
# pull it, which is then used as it is. --force rebuilds the stand-ins (never touches a real image).
# The common base is `debootstrap --variant=minbase bookworm` imported with `podman import`; it trusts the
# machine's extra CA certificates (a TLS-inspecting proxy's) so that apt and pip inside the builds work.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
base=localhost/waifu-test-standin-base:bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
force=0
if [ "${1:-}" = --force ]; then force=1; shift; fi

is_standin() { [ -n "$(podman image inspect --format '{{index .Labels "org.waifu.test-standin"}}' "$1" 2>/dev/null)" ]; }

todo=()
for spec in "$@"; do
    kind="${spec%%=*}" name="${spec#*=}"
    [ -f "$here/$kind/Containerfile" ] || { echo "build.sh: no stand-in for '$kind'" >&2; exit 2; }
    if podman image exists "$name"; then
        if ! is_standin "$name"; then echo "stand-ins: $name is a real image here, using it"; continue; fi
        if [ "$force" = 0 ]; then echo "stand-ins: $name (stand-in) already built"; continue; fi
    fi
    todo+=("$spec")
done
[ "${#todo[@]}" -gt 0 ] || exit 0

if [ "$force" = 1 ] || ! podman image exists "$base"; then
    rootfs="$(mktemp -d /var/tmp/waifu-standin-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    echo "stand-ins: debootstrap --variant=minbase bookworm from $mirror"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$mirror" > "$rootfs.log" 2>&1 \
        || { tail -n 30 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
    rm -f "$rootfs.log"
    # the machine's CA certificates that Debian's bundle lacks (e.g. a TLS-inspecting proxy's)
    python3 - "$rootfs" <<'PY'
import re, sys
pem = re.compile(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)
root = sys.argv[1]
host = pem.findall(open("/etc/ssl/certs/ca-certificates.crt").read())
debian = set(pem.findall(open(f"{root}/etc/ssl/certs/ca-certificates.crt").read()))
for i, cert in enumerate(c for c in host if c not in debian):
    open(f"{root}/usr/local/share/ca-certificates/host-{i}.crt", "w").write(cert + "\n")
PY
    chroot "$rootfs" update-ca-certificates > /dev/null
    # what Debian's official images carry: updates and security, and apt keeps no caches in the image
    printf '%s\n' "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
        "deb ${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security} bookworm-security main" \
        > "$rootfs/etc/apt/sources.list"
    cp "$here/apt-docker-clean.conf" "$rootfs/etc/apt/apt.conf.d/docker-clean"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["bash"]' - "$base" > /dev/null
    echo "stand-ins: base $base imported"
fi

for spec in "${todo[@]}"; do
    kind="${spec%%=*}" name="${spec#*=}"
    echo "stand-ins: building $name from $kind/Containerfile"
    podman build --quiet --format docker --label "org.waifu.test-standin=$name" -t "$name" "$here/$kind" > /dev/null
done
