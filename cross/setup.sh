#!/usr/bin/env bash
# Installs what cross/build.sh and cross/smoke.sh need, idempotently: run it
# again at any time, it changes only what is missing.
#
#   rustup targets   aarch64-unknown-linux-musl, x86_64-unknown-linux-musl
#   Debian packages  gcc-aarch64-linux-gnu libc6-dev-arm64-cross musl-tools
#                    qemu-user-static (and python3-venv if venv is missing)
#   zig              ziglang from PyPI, in a venv at target/cross-venv
#   cargo tools      cargo-zigbuild, cargo-deb (cargo install --locked)
#
# apt-get needs root: run as root, or with sudo available.
set -euo pipefail

# Pinned versions. ziglang 0.14.1 is the zig that cargo-zigbuild is most
# widely used with; cargo-zigbuild >= 0.23 also filters the
# --fix-cortex-a53-843419 linker flag newer rustc passes for aarch64.
ZIGLANG_VERSION=0.14.1
CARGO_ZIGBUILD_VERSION=0.23.4
CARGO_DEB_VERSION=3.6.2

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/target/cross-venv

say() { printf 'setup: %s\n' "$*"; }

# 1. Rust targets (rustup skips installed ones).
say "rustup targets"
rustup target add aarch64-unknown-linux-musl x86_64-unknown-linux-musl

# 2. Debian packages, only those missing.
APT_PACKAGES=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross musl-tools qemu-user-static)
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    APT_PACKAGES+=(python3-venv)
fi
missing=()
for p in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    SUDO=()
    if [ "$(id -u)" -ne 0 ]; then
        SUDO=(sudo)
    fi
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    say "Debian packages present"
fi

# 3. zig, from PyPI, in a venv under target/ (ignored by git).
if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV"
    python3 -m venv "$VENV"
fi
have_zig=$("$VENV/bin/python" -m ziglang version 2>/dev/null || true)
if [ "$have_zig" != "$ZIGLANG_VERSION" ]; then
    say "pip install ziglang==$ZIGLANG_VERSION"
    "$VENV/bin/pip" install --disable-pip-version-check -q "ziglang==$ZIGLANG_VERSION"
fi
say "zig $("$VENV/bin/python" -m ziglang version)"

# 4. cargo subcommands, at the pinned versions.
cargo_tool() { # crate version
    if cargo install --list | grep -q "^$1 v$2:"; then
        say "$1 $2 present"
    else
        say "cargo install --locked $1 --version $2"
        cargo install --locked "$1" --version "$2"
    fi
}
cargo_tool cargo-zigbuild "$CARGO_ZIGBUILD_VERSION"
cargo_tool cargo-deb "$CARGO_DEB_VERSION"

say "done; next: cross/build.sh x86_64 (or aarch64)"
