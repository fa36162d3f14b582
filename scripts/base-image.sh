#!/usr/bin/env bash
# Build a stand-in for python:3.11-slim from Debian's archive alone.
#
# For build hosts that reach no container registry, only a Debian mirror and a
# PyPI mirror (air-gapped networks, CI here): `bentoml containerize` starts
# FROM python:3.11-slim, so that tag must exist locally. The result is Debian
# bookworm (minbase) with Debian's Python 3.11, venv and pip, laid out where
# the official image has them (/usr/local/bin/python, pip).
#
# The host's CA bundle goes into the image too (SSL_CERT_FILE, PIP_CERT,
# UV_SYSTEM_CERTS): on networks whose HTTPS passes an intercepting proxy or a
# mirror with a private CA, it is what lets pip and uv inside the build reach
# the index. On a plain network it is just the usual public CAs.
#
# PYPI_MIRROR, when set, becomes pip's and uv's index inside builds on this base.
#
#   scripts/base-image.sh            build the tag unless it exists
#   BASE_IMAGE=... DEBIAN_MIRROR=... PYPI_MIRROR=... CA_BUNDLE=... scripts/base-image.sh
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "$BASE_IMAGE: present"
    exit 0
fi
# A registry that answers wins: the official image is the one users get.
if timeout 60 docker pull "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "$BASE_IMAGE: pulled"
    exit 0
fi
echo "$BASE_IMAGE: no registry reachable; building it from $MIRROR ($SUITE)"

command -v debootstrap >/dev/null || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3.11,python3.11-venv,python3-pip,ca-certificates \
    "$SUITE" "$root" "$MIRROR" >/dev/null

# Where the official image has them; pip as a command, no "externally managed" refusal.
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3.11"
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python3"
ln -sf /usr/bin/python3.11 "$root/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
rm -f "$root"/usr/lib/python3.11/EXTERNALLY-MANAGED
cp "$CA_BUNDLE" "$root/etc/ssl/certs/build-ca-bundle.crt"
# A minimal image: no package lists, no apt cache.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb

ca=/etc/ssl/certs/build-ca-bundle.crt
index=()
if [ -n "${PYPI_MIRROR:-}" ]; then
    index=(--change "ENV PIP_INDEX_URL=$PYPI_MIRROR" --change "ENV UV_DEFAULT_INDEX=$PYPI_MIRROR")
fi
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PYTHON_VERSION=3.11' \
    --change "ENV SSL_CERT_FILE=$ca" \
    --change "ENV PIP_CERT=$ca" \
    --change "ENV REQUESTS_CA_BUNDLE=$ca" \
    --change 'ENV UV_SYSTEM_CERTS=1' \
    --change 'CMD ["python3"]' \
    "${index[@]}" \
    - "$BASE_IMAGE" >/dev/null
echo "$BASE_IMAGE: built from Debian's archive"
