#!/usr/bin/env bash
# Build the static release binary for one target name from
# openwrt-feed/targets.txt (x86_64, aarch64, armv7, arm, mips, mipsel).
# Prints the path of the binary on stdout.
#  - x86_64: rust-std is installed; Debian's musl-gcc compiles OpenSSL.
#  - aarch64: rust-std is installed; zig compiles and links (cargo-zigbuild).
#  - armv7, arm, mips, mipsel: no rust-std exists (tier 3 or not mirrored),
#    so std is built from source: -Zbuild-std on stable, allowed by
#    RUSTC_BOOTSTRAP=1. The MIPS work-arounds live in .cargo/config.toml and
#    cross/perl-openssl.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: cross/build.sh <target-name>}
triple=$(awk -v n="$name" '$1 == n {print $2}' openwrt-feed/targets.txt)
[ -n "$triple" ] || { echo "unknown target '$name' (see openwrt-feed/targets.txt)" >&2; exit 2; }
# A RUSTFLAGS variable would replace the per-target flags of .cargo/config.toml
# (and bring back the static-pie crash on MIPS).
unset RUSTFLAGS
case "$name" in
    x86_64) cargo build --release --quiet --target "$triple" >&2 ;;
    aarch64) cargo zigbuild --release --quiet --target "$triple" >&2 ;;
    *) RUSTC_BOOTSTRAP=1 cargo zigbuild --release --quiet -Zbuild-std=std,panic_abort --target "$triple" >&2 ;;
esac
echo "target/$triple/release/ctrl-exec"
