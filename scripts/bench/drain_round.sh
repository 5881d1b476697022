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
#   STRACE=1 FILL=400000 BIN=target/release/meridian scripts/bench/drain_round.sh 3
#       # also: the broker's reads (pread64) for one second once the drain has begun
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
if [ -n "${STRACE:-}" ]; then
  # The drain has begun once the subscription has sent something.
  for k in $(seq 1200); do
    out=$(curl -s http://127.0.0.1:$wp/admin/v2/persistent/public/default/d-0/stats |
      python3 -c 'import json,sys; print(json.load(sys.stdin).get("msgOutCounter",0))' 2>/dev/null)
    [ "${out:-0}" -gt 1000 ] && break; sleep 0.1
  done
  timeout 1 strace -f -e trace=pread64 -p $bpid -o $work/strace.txt 2>/dev/null
  python3 - "$work/strace.txt" <<'PY'
import re, sys
sizes = [int(m.group(1)) for m in re.finditer(r"pread64\(.*\) = (\d+)", open(sys.argv[1]).read())]
mean = sum(sizes) / len(sizes) if sizes else 0
print(f"strace, 1 s of the drain: {len(sizes)} pread64, {sum(sizes)} bytes, {mean:.0f} bytes each")
PY
fi
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
