#!/usr/bin/env bash
# `make compose-test`: the whole stack of docker-compose.yml built and run under podman, checked end to end
# (deploy/compose_test.py says what is checked). Needs root (rootful podman) and Debian's package mirror;
# installs what a fresh machine lacks, non-interactively.
set -euo pipefail
cd "$(dirname "$0")/.."

# podman 4.3 with runc (crun refuses cgroups v1/hybrid), netavark + aardvark-dns (networks with service
# names), catatonit (compose's `init: true`), debootstrap (stand-in base images), docker-compose v1 (drives
# the stack through podman's Docker API, see docs/operations.md for why not podman-compose)
packages=(podman runc netavark aardvark-dns catatonit debootstrap docker-compose iptables uidmap)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q > /dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" < /dev/null > /dev/null
fi

exec python3 deploy/compose_test.py "$@"
