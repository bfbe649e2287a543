#!/usr/bin/env bash
# Removes what the compose test keeps between runs: the waifu image it built and the test stand-in base
# images (those labelled org.waifu.test-standin, never a real pulled image), plus anything a killed run left.
set -uo pipefail
command -v podman > /dev/null || exit 0
export CONTAINERS_CONF="$(cd "$(dirname "$0")" && pwd)/containers.conf"
project=waifu-compose-test
podman ps -aq --filter "label=com.docker.compose.project=$project" | xargs -r podman rm -f > /dev/null
podman volume ls -q --filter "label=com.docker.compose.project=$project" | xargs -r podman volume rm -f > /dev/null
podman network ls -q --filter "label=com.docker.compose.project=$project" | xargs -r podman network rm > /dev/null
podman images -q --filter "label=com.docker.compose.project=$project" | xargs -r podman rmi -f > /dev/null
podman rmi -f waifu:latest > /dev/null 2>&1
podman images --format '{{.ID}}' --filter label=org.waifu.test-standin | sort -u | xargs -r podman rmi -f > /dev/null
podman rmi -f localhost/waifu-test-standin-base:bookworm > /dev/null 2>&1
podman image prune -f > /dev/null
echo "compose test images and leftovers removed"
