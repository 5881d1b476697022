#!/bin/bash
# One drain round on a fresh `meridian standalone`, through Meridian's own client
# (`meridian perf`), which acknowledges a batch's entry once every message of it is
# acknowledged and, as the official Java and C++/Python clients do, groups acknowledgements
# into one ACK frame for up to 100 ms or 1000 messages (CONSUME_ARGS="--ack-group-ms 0": one
# ACK frame per entry; drain_round.sh's `pulsar` crate sends one ACK frame per message).
# A subscription is created, FILL 1 KiB messages
# (default 200,000; batches of up to 1000 messages / 128 KiB) are published, then one
# consumer receives them all; prints `meridian perf consume`'s JSON summary (with the broker's
# CPU per delivered message).
#
#   BIN=target/release/meridian scripts/bench/drain_perf.sh 1
#
#   PRODUCE_ARGS="--batch-max-messages 0" ... drain_perf.sh 1   # unbatched: an entry per message
#   CONSUME_ARGS="--ack-group-ms 0" ... drain_perf.sh 1          # an ACK frame per entry
#   KEEP=1 ... drain_perf.sh 1   # fill only, and leave the broker running (its pid printed), for
#                                # another consumer (scripts/bench/drain_python.py)
#
# <n> numbers the round: its directory (/tmp/drain-perf/round<n>) and ports (18000 + 10 n).
set -euo pipefail
i=$1
bin=${BIN:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/meridian}
work=/tmp/drain-perf/round$i; rm -rf "$work"; mkdir -p "$work"
bp=$((18000 + i * 10)); wp=$((bp + 1))
"$bin" standalone --data-dir "$work/data" --broker-port $bp --web-port $wp > "$work/broker.log" 2>&1 &
bpid=$!
trap 'kill $bpid 2>/dev/null; wait $bpid 2>/dev/null; rm -rf "$work/data"' EXIT
for _ in $(seq 600); do curl -sf http://127.0.0.1:$wp/admin/v2/brokers/health > /dev/null && break; sleep 0.1; done
topic=persistent://public/default/drain
curl -sf -X PUT http://127.0.0.1:$wp/admin/v2/persistent/public/default/drain-0/subscription/drain > /dev/null
fill=${FILL:-200000}
timeout 120 "$bin" perf produce --url pulsar://127.0.0.1:$bp --admin-url http://127.0.0.1:$wp \
    --topic-prefix $topic --messages "$fill" --warmup 0 --output json ${PRODUCE_ARGS:-} \
    > "$work/fill.json" 2> "$work/fill.err"
if [ -n "${KEEP:-}" ]; then
    trap - EXIT
    echo "broker pid $bpid, pulsar://127.0.0.1:$bp, topic $topic-0, subscription drain, $fill messages"
    exit 0
fi
timeout 120 "$bin" perf consume --url pulsar://127.0.0.1:$bp --admin-url http://127.0.0.1:$wp \
    --topic-prefix $topic --subscription drain --messages "$fill" --warmup 0 \
    --broker-pid $bpid --output json ${CONSUME_ARGS:-} 2> "$work/drain.err" | tee "$work/drain.json"
