#!/usr/bin/env bash
# Native tests of src/check.c (tests/native.c) under AddressSanitizer and
# UndefinedBehaviorSanitizer, plus the wasm module's import/export list.
# Builds into a temporary directory; writes nothing in the checkout.
#
#   plugins/allergy-check/tests/run.sh
set -euo pipefail
dir=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
clang -std=c11 -O1 -g -Wall -Wextra -Werror -Wno-unused-function \
  -fsanitize=address,undefined -fno-sanitize-recover=all \
  -o "$tmp/native" "$dir/tests/native.c"
"$tmp/native"
wasm=$("$dir/build.sh" "$dir" "$tmp")
python3 "$dir/tests/wasm_imports.py" "$wasm" | grep -E '^(import|export)'
