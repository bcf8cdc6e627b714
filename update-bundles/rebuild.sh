#!/usr/bin/env bash
# Rebuilds every example plugin, re-packs and re-signs its bundle with the
# dev vendor key (TEST ONLY). Run from anywhere:
#
#   update-bundles/rebuild.sh
#
# The bundles' created/expires times are fixed below, and ed25519 signatures
# are deterministic, so a rebuild with the same toolchain gives byte-identical
# .cbx files (the test `example_bundle_is_reproducible` checks the wasm).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
created=2026-11-25T00:00:00Z
expires=2031-11-25T00:00:00Z

cargo build --quiet --bin clinicbox
cb="$repo/target/debug/clinicbox"

# plugin dir -> bundle file. A plugin with its own build.sh (C) uses it;
# Rust plugins use build-plugin.sh.
for pair in "plugins/news2:update-bundles/acme-news2.cbx" \
            "plugins/allergy-check:update-bundles/acme-allergy-check.cbx"; do
  dir=${pair%%:*}
  out=${pair##*:}
  if [ -x "$dir/build.sh" ]; then
    wasm=$("$dir/build.sh" "$dir")
  else
    wasm=$(update-bundles/build-plugin.sh "$dir")
  fi
  "$cb" bundle pack --manifest "$dir/plugin.toml" --wasm "$wasm" --out "$out" \
    --created "$created" --expires "$expires"
  "$cb" bundle sign --key update-bundles/dev-vendor.key "$out"
  "$cb" bundle verify --pub update-bundles/dev-vendor.pub "$out"
done
