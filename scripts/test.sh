#!/usr/bin/env bash
# Runs Meridian's whole test suite on a fresh machine: formatting and lint gates, then every
# test. Installs what the tests need on the way. `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== cargo test"
cargo test --workspace --locked

echo "== all tests passed"
