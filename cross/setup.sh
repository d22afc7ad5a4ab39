#!/usr/bin/env bash
# Install what cross builds need, from the package registries only:
# zig (PyPI `ziglang`) as C compiler and linker through cargo-zigbuild (PyPI),
# musl-gcc for x86_64 and qemu-user for running foreign binaries (Debian),
# the musl rust-std where one exists and rust-src for -Zbuild-std (rustup).
# Idempotent: does nothing when everything is present.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need_apt=()
command -v musl-gcc >/dev/null || need_apt+=(musl-tools)
command -v qemu-mips-static >/dev/null || need_apt+=(qemu-user-static)
command -v signify-openbsd >/dev/null || need_apt+=(signify-openbsd)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "cross/setup: installing ${need_apt[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! command -v cargo-zigbuild >/dev/null || ! python3 -m ziglang version >/dev/null 2>&1; then
    echo "cross/setup: installing ziglang and cargo-zigbuild from PyPI" >&2
    python3 -m pip install -q --disable-pip-version-check ziglang==0.17.1 cargo-zigbuild==0.24.1
fi
installed=$(rustup target list --installed)
for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    grep -qx "$t" <<<"$installed" || rustup target add "$t" >&2
done
rustup component list --installed | grep -q '^rust-src' || rustup component add rust-src >&2
