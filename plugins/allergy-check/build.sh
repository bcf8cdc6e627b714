#!/usr/bin/env bash
# Builds the allergy-check plugin (freestanding C) to wasm32-unknown-unknown,
# reproducibly, and prints the path of the .wasm it made on stdout.
#
#   plugins/allergy-check/build.sh [PLUGIN_DIR] [TARGET_DIR]
#
# PLUGIN_DIR defaults to this script's directory; TARGET_DIR to
# <repo>/target/plugins. The module is TARGET_DIR/allergy-check.wasm.
#
# Needs clang and wasm-ld (Debian packages clang and lld); installs them
# with apt-get when clang or wasm-ld is missing. Reproducible: the same
# clang and the same source give the same bytes, wherever the checkout is
# (source paths are remapped, no debug info, every custom section stripped).
# Everything but the .wasm path goes to stderr.
set -euo pipefail
script_dir=$(cd "$(dirname "$0")" && pwd)
plugin_dir=$(cd "${1:-$script_dir}" && pwd)
repo=$(cd "$script_dir/../.." && pwd)
target_dir=${2:-$repo/target/plugins}
src="$plugin_dir/src/check.c"
out="$target_dir/allergy-check.wasm"

if ! command -v clang >/dev/null || ! command -v wasm-ld >/dev/null; then
  sudo=
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "build.sh: installing clang and lld with apt-get" >&2
  $sudo apt-get update >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y clang lld >&2
fi

mkdir -p "$target_dir"
tmp=$(mktemp "$target_dir/.allergy-check.XXXXXX")
trap 'rm -f "$tmp"' EXIT

# -mcpu=mvp: plain WebAssembly 1.0, whatever the clang default.
# -ffreestanding: no libc, and loops are not turned back into memcpy calls.
# No --allow-undefined: every import is declared with import_module /
# import_name in check.c, so any other undefined symbol fails the link.
# --stack-first: a stack overflow traps instead of running into the data.
clang --target=wasm32-unknown-unknown -mcpu=mvp -std=c11 -O2 \
  -ffreestanding -nostdlib -fvisibility=hidden -g0 \
  -Wall -Wextra -Werror \
  "-ffile-prefix-map=$plugin_dir=/plugins/allergy-check" \
  -Wl,--no-entry -Wl,--export=check -Wl,--strip-all \
  -Wl,--stack-first -Wl,-z,stack-size=131072 \
  -o "$tmp" "$src" >&2
mv -f "$tmp" "$out"
trap - EXIT
echo "$out"
