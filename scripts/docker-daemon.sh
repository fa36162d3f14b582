#!/usr/bin/env bash
# Make sure a Docker daemon answers; start one (root only) when none does.
#
# Build hosts without a bridge network (CI here) get Debian's docker.io,
# started with no bridge, no iptables and no NAT: images are built and run
# with `--network host` and only ever talk to loopback.
set -euo pipefail

if docker info >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "no Docker daemon answers, and starting one needs root" >&2
    exit 1
fi
if ! command -v dockerd >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi
log="${DOCKERD_LOG:-/var/log/sd35-dockerd.log}"
# setsid: the daemon outlives this script and the make that ran it.
setsid dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false >>"$log" 2>&1 </dev/null &
for _ in $(seq 60); do
    if docker info >/dev/null 2>&1; then
        exit 0
    fi
    sleep 1
done
echo "dockerd did not come up; see $log" >&2
tail -20 "$log" >&2
exit 1
