#!/usr/bin/env bash
# Builds one example plugin to wasm32-unknown-unknown, reproducibly, and
# prints the path of the .wasm it made.
#
#   update-bundles/build-plugin.sh PLUGIN_DIR [TARGET_DIR]
#
# Reproducible means: the same rustc, the same Cargo.lock and the same
# sources give the same bytes, wherever the checkout and CARGO_HOME are.
# Source paths (the plugin's own and the registry's) are remapped, since
# panic-location strings embed them; the release profile in the plugin's
# Cargo.toml does the rest (one codegen unit, fat LTO, no debug info).
set -euo pipefail
plugin_dir=$(cd "${1:?usage: build-plugin.sh PLUGIN_DIR [TARGET_DIR]}" && pwd)
repo=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${2:-$repo/target/plugins}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
name=$(basename "$plugin_dir")

rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown \
  || rustup target add wasm32-unknown-unknown >&2

export RUSTFLAGS="--remap-path-prefix=$plugin_dir=/plugins/$name --remap-path-prefix=$cargo_home=/cargo"
export CARGO_TARGET_DIR=$target_dir
unset CARGO_BUILD_RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
cargo build --quiet --locked --release --target wasm32-unknown-unknown \
  --manifest-path "$plugin_dir/Cargo.toml" >&2
echo "$target_dir/wasm32-unknown-unknown/release/${name//-/_}.wasm"
