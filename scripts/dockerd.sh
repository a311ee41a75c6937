#!/usr/bin/env bash
# Start a Docker engine if none answers (no bridge, no iptables: containers use --network
# host). Installs docker.io, debootstrap and docker-compose from Debian when missing.
# Exit 3 when no engine can run here (the callers skip then).
set -euo pipefail
if docker info >/dev/null 2>&1; then exit 0; fi
[ "$(id -u)" = 0 ] || { echo "dockerd needs root" >&2; exit 3; }
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null || ! command -v docker-compose >/dev/null; then
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap docker-compose >/dev/null || exit 3
fi
nohup dockerd --storage-driver=vfs --bridge=none --iptables=false >/tmp/dockerd.log 2>&1 &
echo $! > /tmp/llamafleet-dockerd.pid  # docker-smoke.sh stops the engine it started
for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done
echo "dockerd did not start; see /tmp/dockerd.log" >&2
exit 3
