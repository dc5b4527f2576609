#!/usr/bin/env bash
# Installs what gmigrate needs on a fresh machine of this project's kind (Debian 12 with
# Swift 6.3 under /opt/swift), as root. Safe to run again: it installs only what is missing.
set -euo pipefail

if ! command -v swift >/dev/null 2>&1; then
    if [ -x /opt/swift/usr/bin/swift ]; then
        echo "setup: add /opt/swift/usr/bin to PATH (export PATH=/opt/swift/usr/bin:\$PATH)" >&2
    else
        echo "setup: Swift 6.3 is required (swift not found)" >&2
    fi
    exit 1
fi

# Debian packages: util-linux's setpriv runs clients as an unprivileged user in the tests; curl
# for the README's API examples; libnl-3 (pkg-config) for netlink; iproute2 for the network tests;
# systemd for systemd-socket-activate and systemd-analyze (the socket unit tests); binutils to
# assemble the guest programs (tools/build-guests, and the test that the embedded bytes match).
packages=(util-linux curl pkg-config libnl-3-dev libnl-route-3-dev iproute2 systemd binutils)
missing=()
for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if [ ! -c /dev/kvm ]; then
    echo "setup: note: /dev/kvm is missing: real-KVM tests will skip (and fail under GMIGRATE_REQUIRE_KVM=1); the model runs everywhere" >&2
elif [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "setup: note: /dev/kvm is not readable and writable by $(id -un): run as root or join the kvm group" >&2
fi
