#!/bin/bash
# Publish with the independent load generator (crates/meridian/examples/pulsar_produce, built
# with `cargo build --release -p meridian --example pulsar_produce`) on a fresh
# `meridian standalone`, and print each broker thread's context switches over 5 s of it
# (scripts/bench/thread_switches.py), then the generator's figures (issue 16).
#
#   BIN=target/release/meridian TOPICS=100 scripts/bench/produce_threads.sh
#   TOKIO_WORKER_THREADS=1 BIN=... scripts/bench/produce_threads.sh   # one runtime worker
#   MERIDIAN_STORAGE__FLUSH_THREADS=1 BIN=... scripts/bench/produce_threads.sh
set -eu -o pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d /tmp/produce-threads.XXXXXX)
bp=${PORT:-17200}; wp=$((bp + 1))
"${BIN:-$root/target/release/meridian}" standalone --data-dir "$work/data" --broker-port $bp \
    --web-port $wp > "$work/broker.log" 2>&1 &
bpid=$!
trap 'kill $bpid 2>/dev/null; wait $bpid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 600); do
  curl -sf http://127.0.0.1:$wp/admin/v2/brokers/health > /dev/null && break; sleep 0.1
done
timeout 60 "$root/target/release/examples/pulsar_produce" --url pulsar://127.0.0.1:$bp \
    --broker-pid $bpid --size 1024 --topics "${TOPICS:-100}" --warmup 3 --duration 8 \
    > "$work/gen.out" 2> "$work/gen.err" &
gpid=$!
sleep 5
python3 "$root/scripts/bench/thread_switches.py" $bpid 5
wait $gpid
tail -1 "$work/gen.out"
