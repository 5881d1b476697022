#!/bin/bash
# One drain round on a fresh `meridian standalone`: the load generator
# (crates/meridian/examples/pulsar_produce, built with `cargo build --release -p meridian
# --example pulsar_produce`) fills a topic with FILL 1 KiB messages (default 200,000), then one
# consumer reads them all back; prints the generator's JSON (broker CPU per delivered message).
# If the drain does not end within 90 s it saves the topic's stats and internal stats instead.
#
#   BIN=target/release/meridian scripts/bench/drain_round.sh 1
#   WRAP="valgrind --tool=callgrind --callgrind-out-file=/tmp/cg-drain" FILL=20000 \
#       BIN=target/release/meridian scripts/bench/drain_round.sh 2   # then: grep ^summary /tmp/cg-drain
#
# <n> numbers the round: its directory (/tmp/drain/round<n>) and ports (17000 + 10 n).
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
i=$1
work=/tmp/drain/round$i; rm -rf $work; mkdir -p $work
bp=$((17000+i*10)); wp=$((bp+1))
${WRAP:-} ${BIN:-$root/target/release/meridian} standalone --data-dir $work/data --broker-port $bp --web-port $wp > $work/broker.log 2>&1 &
bpid=$!
for k in $(seq 600); do curl -sf http://127.0.0.1:$wp/admin/v2/brokers/health >/dev/null && break; sleep 0.1; done
start=$(date +%s)
timeout 200 $root/target/release/examples/pulsar_produce --url pulsar://127.0.0.1:$bp --broker-pid $bpid --fill ${FILL:-200000} --topic-prefix persistent://public/default/d > $work/gen.out 2> $work/gen.err &
gpid=$!
stalled=0
while kill -0 $gpid 2>/dev/null; do
  sleep 1
  if [ $(( $(date +%s) - start )) -gt 90 ]; then stalled=1; break; fi
done
if [ $stalled = 1 ]; then
  echo "round $i STALLED"
  curl -s http://127.0.0.1:$wp/admin/v2/persistent/public/default/d-0/stats > $work/stats1.json
  curl -s "http://127.0.0.1:$wp/admin/v2/persistent/public/default/d-0/internalStats" > $work/istats1.json
  kill $gpid
else
  wait $gpid; echo "round $i rc=$? $(tail -1 $work/gen.out)"
  rm -rf $work/data
fi
kill $bpid; wait $bpid 2>/dev/null
