#!/bin/bash
# End-to-end latency at half the maximum rate (issue 16's "p99 <= 5 ms at half the maximum
# rate"): on a fresh `meridian standalone`, one `meridian perf end-to-end` run at full speed
# finds the maximum rate, then ROUNDS runs at half of it (or at RATE if set), each on a topic of
# its own; prints one line per run: msg/s, end-to-end p50/p95/p99/p99.9/max (ms), broker µs/msg.
#
#   BIN=target/release/meridian scripts/bench/e2e_half_rate.sh 1
#   ROUNDS=3 DURATION=8 RATE=80000 BIN=... scripts/bench/e2e_half_rate.sh 2
#   PERF_ARGS="--topics 10" RATE=40000 BIN=... scripts/bench/e2e_half_rate.sh 3   # more perf flags
#
# <n> numbers the run: its directory (/tmp/e2e/run<n>) and ports (17500 + 10 n).
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${BIN:-$root/target/release/meridian}
i=$1
work=/tmp/e2e/run$i; rm -rf $work; mkdir -p $work
bp=$((17500+i*10)); wp=$((bp+1))
$bin standalone --data-dir $work/data --broker-port $bp --web-port $wp > $work/broker.log 2>&1 &
bpid=$!
trap 'kill $bpid 2>/dev/null; wait $bpid 2>/dev/null' EXIT
for k in $(seq 600); do curl -sf http://127.0.0.1:$wp/admin/v2/brokers/health >/dev/null && break; sleep 0.1; done

run() { # <topic prefix> <rate>
  $bin perf end-to-end --url pulsar://127.0.0.1:$bp --admin-url http://127.0.0.1:$wp \
    --topic-prefix "$1" --rate "$2" --duration ${DURATION:-8} --warmup 2 --broker-pid $bpid \
    --output json ${PERF_ARGS:-} 2> $work/$1.lines > $work/$1.json
  jq -r --arg rate "$2" '"rate \($rate): \(.receive.msg_per_s | floor) msg/s, e2e p50 \(.end_to_end_latency_ms.p50) p95 \(.end_to_end_latency_ms.p95) p99 \(.end_to_end_latency_ms.p99) p99.9 \(.end_to_end_latency_ms.p99_9) max \(.end_to_end_latency_ms.max) ms, broker \(.broker_cpu.us_per_message * 100 | round / 100) us/msg, \(.broker_cpu.per_message.voluntary_switches * 1000 | round / 1000) vol. switches/msg"' $work/$1.json
}

rate=${RATE:-}
if [ -z "$rate" ]; then
  run max 0
  rate=$(jq -r '.receive.msg_per_s / 2 | floor' $work/max.json)
fi
for r in $(seq ${ROUNDS:-3}); do run half$r $rate; done
