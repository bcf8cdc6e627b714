#!/usr/bin/env bash
# Reproducible release build of the static musl binary and its .deb.
#
#   cross/build.sh x86_64|aarch64
#
# Builds with `cargo zigbuild --release --locked` for
# <arch>-unknown-linux-musl, copies the binary to
# dist/clinicbox-<version>-<arch>, packages it with `cargo deb --no-build`
# into dist/, checks that the .deb holds exactly that binary, and prints
# the sha256 of both (also written to dist/SHA256SUMS-<arch>).
#
# Reproducibility: the same commit built twice (on any path, by any user)
# gives the same bytes. Inputs are pinned (Cargo.lock via --locked, the
# toolchain, cross/setup.sh's versions); time comes from the last commit
# (SOURCE_DATE_EPOCH; C's __DATE__/__TIME__ are fixed); build paths are
# remapped (--remap-path-prefix for Rust, -ffile-prefix-map for the C in
# sqlite, ring and mimalloc); debug info is
# stripped (it carries paths), symbols are kept for readable backtraces.
# The binary is never stripped again by cargo-deb (--no-strip), so the
# packaged file is the one whose hash is printed.
set -euo pipefail

die() { printf 'build: %s\n' "$*" >&2; exit 1; }

ARCH=${1:-}
case "$ARCH" in
x86_64 | aarch64) ;;
*) die "usage: cross/build.sh x86_64|aarch64" ;;
esac
TRIPLE=$ARCH-unknown-linux-musl

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=$ROOT/target/cross-venv
CARGO_HOME_DIR=${CARGO_HOME:-$HOME/.cargo}

[ -x "$VENV/bin/python" ] || die "no $VENV: run cross/setup.sh first"
ZIG_DIR=$("$VENV/bin/python" -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))') ||
    die "ziglang missing in $VENV: run cross/setup.sh"
export PATH="$ZIG_DIR:$PATH" # cargo-zigbuild runs the first `zig` on PATH
command -v cargo-zigbuild >/dev/null 2>&1 || die "cargo-zigbuild missing: run cross/setup.sh"

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
[ -n "$VERSION" ] || die "cannot read the version from Cargo.toml"

# Time: the last commit, not now (cargo-deb uses it for file dates too).
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)} ||
    die "not a git checkout: set SOURCE_DATE_EPOCH to the source's date"
export SOURCE_DATE_EPOCH
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    printf 'build: WARNING: uncommitted changes; this build is not reproducible from a commit\n' >&2
fi

# Paths: the checkout and the cargo registry become fixed names.
RUSTFLAGS="--remap-path-prefix=$ROOT=/build/clinicbox --remap-path-prefix=$CARGO_HOME_DIR=/cargo -C target-feature=+crt-static"
export RUSTFLAGS
C_PREFIX_MAPS="-ffile-prefix-map=$ROOT=/build/clinicbox -ffile-prefix-map=$CARGO_HOME_DIR=/cargo"
# Time in C: mimalloc embeds __DATE__ and __TIME__. clang would take them
# from SOURCE_DATE_EPOCH, but cargo and zig reuse C objects compiled at an
# earlier commit (zig's cache key ignores SOURCE_DATE_EPOCH), whose time
# then lands in this build: fixed values instead.
C_FIXED_TIME='-Wno-builtin-macro-redefined -D__DATE__="Jan_01_1970" -D__TIME__="00:00:00"'
export "CFLAGS_${TRIPLE//-/_}=$C_PREFIX_MAPS $C_FIXED_TIME"
# Debug info carries paths and doubles the size; symbols stay.
export CARGO_PROFILE_RELEASE_STRIP=debuginfo
export CARGO_INCREMENTAL=0
# The same locale and timezone for every tool.
export LC_ALL=C TZ=UTC

printf 'build: clinicbox %s for %s (SOURCE_DATE_EPOCH=%s, zig %s)\n' \
    "$VERSION" "$TRIPLE" "$SOURCE_DATE_EPOCH" "$(zig version)"
cargo zigbuild --release --locked --target "$TRIPLE"

mkdir -p dist
BIN=dist/clinicbox-$VERSION-$ARCH
cp "target/$TRIPLE/release/clinicbox" "$BIN"
chmod 0755 "$BIN"
touch -d "@$SOURCE_DATE_EPOCH" "$BIN"

# The .deb. cargo-deb reads target/$TRIPLE/release/clinicbox (the same
# target dir as above) and its [package.metadata.deb] from Cargo.toml.
grep -q '^\[package\.metadata\.deb\]' Cargo.toml ||
    die "Cargo.toml has no [package.metadata.deb] (see packaging/deb-metadata-notes.toml)"
cargo deb --version >/dev/null 2>&1 || die "cargo-deb missing: run cross/setup.sh"
case "$ARCH" in
x86_64) DEB_ARCH=amd64 ;;
aarch64) DEB_ARCH=arm64 ;;
esac
rm -f dist/clinicbox_*_"$DEB_ARCH".deb
cargo deb --no-build --no-strip --locked --target "$TRIPLE" --output dist/
DEBS=(dist/clinicbox_"$VERSION"*_"$DEB_ARCH".deb)
if [ ${#DEBS[@]} -ne 1 ] || [ ! -f "${DEBS[0]}" ]; then
    die "expected one dist/clinicbox_${VERSION}*_$DEB_ARCH.deb, found: ${DEBS[*]}"
fi
DEB=${DEBS[0]}

# The packaged binary must be the one built above, byte for byte.
BIN_SUM=$(sha256sum "$BIN" | cut -d' ' -f1)
DEB_BIN_SUM=$(dpkg-deb --fsys-tarfile "$DEB" | tar -xOf - --wildcards '*usr/bin/clinicbox' | sha256sum | cut -d' ' -f1)
[ "$BIN_SUM" = "$DEB_BIN_SUM" ] ||
    die "the binary in $DEB ($DEB_BIN_SUM) is not $BIN ($BIN_SUM)"

(cd dist && sha256sum "$(basename "$BIN")" "$(basename "$DEB")") | tee "dist/SHA256SUMS-$ARCH"
printf 'build: ok: %s and %s\n' "$BIN" "$DEB"
