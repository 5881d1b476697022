"""Replicated-subscription benchmark: duplicates after a SIGKILL failover under a steady load with
out-of-order acknowledgements, per sync interval, next to what a mark-delete-only sync (Pulsar's)
would redeliver; and the broker CPU that replicated subscriptions cost over plain replication.

Usage (from the repository root, after `cargo build --release`):

    compat/.venv/bin/python scripts/bench/replicated_subscriptions.py target/release/meridian \
        [--rate 500] [--duration 8] [--intervals 10,100,1000]

Failover runs, one per interval: clusters a and b replicate `t/ns` both ways; the namespace's sync
interval is set on a; a producer on a sends 1 KiB messages at `--rate`; two Shared consumers on a
(replicated subscription) acknowledge 90% of the messages at once and hold every tenth for half a
second before acknowledging it (out of order). After `--duration` s, a is killed with SIGKILL; a
consumer on b drains the subscription. Duplicates are messages b delivers that a had acknowledged;
"mark-delete only" counts the messages b would have redelivered had only a's mark-delete position
been synced (everything present on b after a's first unacknowledged message).

Cost run: the same load for `--duration` s on a topic with a plain subscription and on one with a
replicated subscription; broker a's CPU (utime + stime) per message consumed.

Max run (`--max`, instead of the above): `--rounds` rounds (default 3), each running the same
load with no rate limit (the producer keeps its queue full) for `--duration` s, first on a topic
with a plain subscription, then on one with a replicated subscription (the order alternates
between rounds), each run on a fresh pair of brokers (`--in-order`: no message held back);
prints per run the messages consumed per second, broker a's and b's CPU
(utime + stime) per message consumed (b's also as user and system apart) and b's context switches
per message. The Python client may be the bottleneck; the script says what the clients' own CPU
was, so that can be judged. `--b-subscription`: a third run per round, plain replication with a
durable subscription without a consumer on b (what the replicated run's b holds), to tell a
subscription's existence apart from the sync. `--perf-b DIR` / `--strace-b DIR`: `perf record`
(DWARF call graphs) or `strace -c -f` broker b during each measured window, one file per run.
`--callgrind-b DIR`: broker b runs under valgrind's callgrind and the load is held at `--rate`
msg/s (b is ~50 times slower under it); prints b's instructions executed per message over the
window — a count that, unlike CPU time, other work on the machine does not disturb.
`--callgrind-a DIR`: the same for broker a, the sender (one of the two per invocation). For a
replicated run, it also prints the instructions spent in each part of the sync (inclusive costs
of the functions where each part starts, from `callgrind_annotate`), per message and per state
received: a figure that does not depend on comparing two runs whose batching differs.

Tail run (`--tail N`, instead of the above): one old message is left unacknowledged on a, then N
messages are produced and acknowledged (a long acknowledged tail behind it, on both clusters
once synced); then for `--duration` s a producer sends `--rate` msg/s that a consumer on a
acknowledges at once. Prints the CPU (utime + stime) of brokers a and b over that window: the
cost of keeping b's copy in sync with a long acknowledged tail.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pulsar

sys.path.insert(0, os.path.dirname(__file__))
from cluster_pair import Broker, http, replicate_namespace  # noqa: E402

PAYLOAD_SIZE = 1024
# The Python client's default acknowledgement grouping time.
ACK_GROUPING_S = 0.1


class Load:
    """A producer at a steady rate and two Shared consumers acknowledging out of order."""

    def __init__(self, client, topic, rate, replicated, hold_every=10):
        """`rate` 0: as fast as the producer's queue allows; `hold_every` 0: nothing held back
        (acknowledgements in order)."""
        self.hold_every = hold_every
        self.acknowledged = {}  # index -> when
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sent = 0
        self.producer = client.create_producer(topic, batching_enabled=False,
                                               block_if_queue_full=rate == 0)
        self.consumers = [
            client.subscribe(topic, "bench", consumer_type=pulsar.ConsumerType.Shared,
                             initial_position=pulsar.InitialPosition.Earliest,
                             replicate_subscription_state_enabled=replicated)
            for _ in range(2)
        ]
        self.threads = [threading.Thread(target=self.produce, args=(rate,), daemon=True)]
        self.threads += [threading.Thread(target=self.consume, args=(consumer,), daemon=True)
                         for consumer in self.consumers]
        for thread in self.threads:
            thread.start()

    def produce(self, rate):
        started = time.time()
        while not self.stop.is_set():
            wait = started + self.sent / rate - time.time() if rate else 0
            if wait > 0:
                time.sleep(wait)
            payload = f"{self.sent:09d}".encode().ljust(PAYLOAD_SIZE, b".")
            try:
                self.producer.send_async(payload, None)
            except Exception:
                return
            self.sent += 1

    def consume(self, consumer):
        held = []
        while not self.stop.is_set():
            try:
                message = consumer.receive(timeout_millis=100)
                index = int(message.data()[:9])
                if self.hold_every and index % self.hold_every == 0:
                    held.append((time.time(), message))
                else:
                    self.ack(consumer, message, index)
            except pulsar.Timeout:
                pass
            except Exception:
                return
            while held and time.time() - held[0][0] > 0.5:
                _, message = held.pop(0)
                try:
                    self.ack(consumer, message, int(message.data()[:9]))
                except Exception:
                    return

    def ack(self, consumer, message, index):
        consumer.acknowledge(message)
        with self.lock:
            self.acknowledged[index] = time.time()

    def halt(self):
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


def drain(client, topic):
    consumer = client.subscribe(topic, "bench", consumer_type=pulsar.ConsumerType.Shared)
    delivered = set()
    while True:
        try:
            message = consumer.receive(timeout_millis=3000)
        except pulsar.Timeout:
            return delivered
        delivered.add(int(message.data()[:9]))
        consumer.acknowledge(message)


def failover_run(binary, root, interval, options):
    a, b = Broker(binary, "a", root), Broker(binary, "b", root)
    try:
        replicate_namespace(a, b)
        http("POST", a.admin + "/admin/v2/namespaces/t/ns/replicatedSubscriptionSyncInterval", interval)
        topic = f"persistent://t/ns/failover-{interval}"
        client_a = pulsar.Client(a.url)
        load = Load(client_a, topic, options.rate, replicated=True)
        time.sleep(options.duration)
        a.kill9()
        killed_at = time.time()
        load.halt()
        client_b = pulsar.Client(b.url)
        delivered = drain(client_b, topic)
        client_b.close()
        acknowledged = set(load.acknowledged)
        duplicates = delivered & acknowledged
        # Acknowledgements reach the broker up to the client's ack grouping time (100 ms) late.
        synced_before = killed_at - interval / 1000 - ACK_GROUPING_S
        last_interval = {index for index, at in load.acknowledged.items() if at > synced_before}
        present = max(delivered | acknowledged, default=-1)
        # A mark-delete-only sync as fresh as ours: a's first unacknowledged message at the
        # last sync, and every message acknowledged after it comes back.
        known = {index for index, at in load.acknowledged.items() if at <= synced_before}
        first_unacknowledged = min((index for index in range(present + 1) if index not in known),
                                   default=present + 1)
        mark_delete_only = sum(1 for index in range(first_unacknowledged, present + 1)
                               if index in acknowledged)
        # Losses: messages a had not acknowledged that b did not deliver, up to the last one
        # b delivered (later ones may not have been replicated before the kill).
        last_delivered = max(delivered, default=-1)
        missing = sum(1 for index in range(last_delivered + 1)
                      if index not in acknowledged and index not in delivered)
        print(f"sync every {interval:>4} ms: sent {load.sent}, acknowledged on a {len(acknowledged)}, "
              f"delivered on b {len(delivered)}; missing on b {missing}; duplicates {len(duplicates)} "
              f"(acknowledged in a's last interval + ack grouping: {len(last_interval)}); "
              f"mark-delete only, as fresh: {mark_delete_only}")
        try:
            client_a.close()
        except Exception:
            pass
    finally:
        for broker in (a, b):
            if broker.process.poll() is None:
                broker.stop()


def cost_run(binary, root, options):
    a, b = Broker(binary, "a", root), Broker(binary, "b", root)
    try:
        replicate_namespace(a, b)
        client = pulsar.Client(a.url)
        for replicated in (False, True):
            topic = f"persistent://t/ns/cost-{'replicated' if replicated else 'plain'}"
            load = Load(client, topic, options.rate, replicated)
            time.sleep(2)  # warm-up
            cpu, consumed = a.cpu_seconds(), len(load.acknowledged)
            time.sleep(options.duration)
            cpu, consumed = a.cpu_seconds() - cpu, len(load.acknowledged) - consumed
            load.halt()
            kind = "replicated subscription" if replicated else "plain subscription     "
            print(f"{kind}: {consumed} messages consumed, broker a CPU {cpu:.2f} s = "
                  f"{cpu / max(consumed, 1) * 1e6:.0f} us per message")
        client.close()
    finally:
        for broker in (a, b):
            broker.stop()


def max_run(binary, options):
    """Each run on a fresh pair of brokers, so that nothing left from the previous one (a
    backlog still replicating) weighs on it."""
    kinds = ["plain", "plain+sub", "replicated"] if options.b_subscription else ["plain",
                                                                                  "replicated"]
    for round_ in range(options.rounds):
        for kind in kinds if round_ % 2 == 0 else reversed(kinds):
            with tempfile.TemporaryDirectory() as root:
                max_one(binary, root, options, round_, kind)


def context_switches(broker):
    """Voluntary and involuntary context switches of every thread of the broker so far."""
    total = [0, 0]
    task = f"/proc/{broker.process.pid}/task"
    for tid in os.listdir(task):
        try:
            with open(f"{task}/{tid}/status") as status:
                for line in status:
                    if line.startswith("voluntary_ctxt_switches"):
                        total[0] += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        total[1] += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


# Where a broker's replicated-subscription work starts, as callgrind_annotate names the
# functions (inclusive costs; none of these calls another). The sync task's own async part
# (`run`) is not always a frame of its own (inlined into tokio's poll), so it may be missing.
SYNC_ROOTS = {
    "HTTP server (state posts received, handler, JSON decoding)":
        r"crates/admin/src/lib.rs:<tokio_util::task::task_tracker::TrackedFuture",
    # (The task `take_command` spawns for each state received as a command; before it had a
    # task of its own, the part of the connection handler's frame in received_state.rs.)
    "binary command received (JSON decoding, checks, answer)":
        r"received_state::take_command::\{\{closure\}\}::\{\{closure\}\}( \[|$)"
        r"|received_state\.rs:\S*handle_other::\{\{closure\}\}$",
    "receive (apply, persist)": r"subscription_sync::receive( \[|$)",
    "sync task, blocking part (applications, walks, the HTTP client's posts)":
        r"subscription_sync.rs:<tokio::runtime::blocking::task::BlockingTask",
    "sync task, async part": r"subscription_sync::run::\{\{closure\}\}( \[|$)",
    "posting own state (task: JSON encoding, the binary command)":
        r"subscription_sync::run::\{\{closure\}\}::\{\{closure\}\}( \[|$)",
}


def sync_breakdown(path, messages):
    """Prints, from a callgrind dump, the instructions spent in each part of the
    replicated-subscription sync per message, and per state received."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", path], check=True,
                          capture_output=True, text=True).stdout
    costs = {}
    for part, pattern in SYNC_ROOTS.items():
        costs[part] = 0
        for line in text.splitlines():
            match = re.match(r"\s*([\d,]+)\s+\([^)]*\)\s+(.*)", line)
            if match and "=>" not in line and re.search(pattern, match.group(2)):
                costs[part] = max(costs[part], int(match.group(1).replace(",", "")))
    calls = [int(match.group(1).replace(",", "")) for match in
             re.finditer(r"=> \S*subscription_sync::receive \(([\d,]+)x\)", text)]
    states = max(calls, default=0)
    for part, cost in costs.items():
        if cost:
            per_state = states and part.startswith(("HTTP", "binary", "receive"))
            print(f"    {part}: {cost / messages:,.0f} per message"
                  + (f", {cost / states:,.0f} per state received" if per_state else ""))
    print(f"    sync total: {sum(costs.values()) / messages:,.0f} per message; "
          f"{states} states received", flush=True)


def callgrind_instructions(broker, directory, name):
    """Dumps the counters of a broker running under callgrind and returns the instructions
    executed since they were last zeroed, and the dump's path."""
    pid = broker.process.pid
    subprocess.run(["callgrind_control", "--dump=" + name, str(pid)], check=True,
                   stdout=subprocess.DEVNULL)
    dumps = [os.path.join(directory, file) for file in os.listdir(directory)
             if file.startswith(f"{broker.name}.{pid}.")]
    for path in sorted(dumps, key=os.path.getmtime, reverse=True):
        with open(path) as dump:
            text = dump.read()
        if f"desc: Trigger: dump {name}\n" in text:
            for line in text.splitlines():
                if line.startswith("totals:") or line.startswith("summary:"):
                    return int(line.split()[1]), path
    raise RuntimeError(f"no callgrind dump named {name} in {directory}")


def max_one(binary, root, options, round_, kind):
    # The broker measured under callgrind, if any: "a" or "b", and where its dumps go.
    measured, callgrind = ("a", options.callgrind_a) if options.callgrind_a else \
        ("b", options.callgrind_b)
    wrappers = {"a": [], "b": []}
    if callgrind:
        os.makedirs(callgrind, exist_ok=True)
        wrappers[measured] = ["valgrind", "--tool=callgrind", "--quiet",
                              "--callgrind-out-file=" + os.path.join(callgrind, measured + ".%p")]
    a, b = Broker(binary, "a", root, wrappers["a"]), Broker(binary, "b", root, wrappers["b"])
    measured = a if measured == "a" else b
    try:
        replicate_namespace(a, b)
        client = pulsar.Client(a.url)
        replicated = kind == "replicated"
        topic = "persistent://t/ns/max"
        if kind == "plain+sub":
            # The control: b holds an ordinary durable subscription without a consumer, as the
            # replicated run's b does, so that only the sync itself differs.
            url = f"{b.admin}/admin/v2/persistent/t/ns/max/subscription/bench"
            status, reply = http("PUT", url)
            if status >= 300:
                raise RuntimeError(f"creating the subscription on b: {status} {reply}")
        rate = options.rate if callgrind else 0
        load = Load(client, topic, rate, replicated, hold_every=0 if options.in_order else 10)
        time.sleep(2)  # warm-up
        if callgrind:
            subprocess.run(["callgrind_control", "--zero", str(measured.process.pid)], check=True,
                           stdout=subprocess.DEVNULL)
        cpu_a, cpu_b, consumed = a.cpu_seconds(), b.cpu_seconds(), len(load.acknowledged)
        switches = context_switches(b)
        b_split = b.cpu_split()
        profiler = None
        if options.perf_b or options.strace_b:
            directory = options.perf_b or options.strace_b
            os.makedirs(directory, exist_ok=True)
            output = os.path.join(directory, f"b-{kind}-{round_ + 1}")
            if options.perf_b:
                command = ["perf", "record", "-q", "--call-graph", "dwarf,16384", "-F", "999",
                           "-o", output + ".data"]
            else:
                command = ["strace", "-c", "-f", "-o", output + ".strace"]
            profiler = subprocess.Popen(command + ["-p", str(b.process.pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        own = os.times()
        started = time.time()
        time.sleep(options.duration)
        elapsed = time.time() - started
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(60)
        instructions = dump = None
        if callgrind:
            instructions, dump = callgrind_instructions(measured, callgrind,
                                                        f"{kind}-{round_ + 1}")
        switches = [now - then for now, then in zip(context_switches(b), switches)]
        b_split = [now - then for now, then in zip(b.cpu_split(), b_split)]
        consumed = len(load.acknowledged) - consumed
        cpu_a, cpu_b = a.cpu_seconds() - cpu_a, b.cpu_seconds() - cpu_b
        after = os.times()
        clients = (after.user - own.user) + (after.system - own.system)
        load.halt()
        per = max(consumed, 1)
        print(f"round {round_ + 1} {kind:>10}: {consumed / elapsed:7.0f} msg/s consumed; "
              f"CPU per message: broker a {cpu_a / per * 1e6:5.1f} us, "
              f"broker b {cpu_b / per * 1e6:5.1f} us (user {b_split[0] / per * 1e6:4.1f}, "
              f"system {b_split[1] / per * 1e6:4.1f}); clients {clients:.1f} s CPU "
              f"in {elapsed:.1f} s; b context switches per message "
              f"{switches[0] / per:.2f} voluntary, {switches[1] / per:.2f} involuntary; "
              f"{consumed} messages"
              + (f"; {measured.name} instructions per message {instructions / per:,.0f}"
                 if instructions is not None else ""),
              flush=True)
        if dump is not None and replicated:
            sync_breakdown(dump, per)
        try:
            client.close()
        except Exception:
            pass
    finally:
        for broker in (a, b):
            broker.stop()


def tail_run(binary, root, options):
    a, b = Broker(binary, "a", root), Broker(binary, "b", root)
    try:
        replicate_namespace(a, b)
        topic = "persistent://t/ns/tail"
        client = pulsar.Client(a.url)
        consumer = client.subscribe(topic, "bench", consumer_type=pulsar.ConsumerType.Shared,
                                    replicate_subscription_state_enabled=True)
        producer = client.create_producer(topic, batching_enabled=False,
                                          block_if_queue_full=True)
        payload = b".".ljust(PAYLOAD_SIZE, b".")
        producer.send(payload)
        consumer.receive()  # the old message, never acknowledged
        for _ in range(options.tail):
            producer.send_async(payload, None)
        producer.flush()
        for _ in range(options.tail):
            consumer.acknowledge(consumer.receive())
        print(f"tail of {options.tail} produced and acknowledged on a", file=sys.stderr)
        # Wait until b's copy caught up: one message left in its backlog.
        deadline = time.time() + 120
        while True:
            status, stats = http("GET", b.admin + "/admin/v2/persistent/t/ns/tail/stats")
            backlog = (stats or {}).get("subscriptions", {}).get("bench", {}).get("msgBacklog") \
                if status == 200 else None
            if backlog == 1:
                break
            if time.time() > deadline:
                raise RuntimeError(f"b did not catch up (backlog {backlog})")
            time.sleep(0.2)
        cpu_a, cpu_b = a.cpu_seconds(), b.cpu_seconds()
        stop = time.time() + options.duration
        sent = 0
        while time.time() < stop:
            wait = stop - options.duration + sent / options.rate - time.time()
            if wait > 0:
                time.sleep(wait)
            producer.send_async(payload, None)
            sent += 1
            try:
                while True:
                    consumer.acknowledge(consumer.receive(timeout_millis=0))
            except pulsar.Timeout:
                pass
        cpu_a, cpu_b = a.cpu_seconds() - cpu_a, b.cpu_seconds() - cpu_b
        print(f"tail of {options.tail} acknowledged behind one unacknowledged message, "
              f"{sent} more messages in {options.duration} s: broker a CPU {cpu_a:.2f} s, "
              f"broker b CPU {cpu_b:.2f} s")
        client.close()
    finally:
        for broker in (a, b):
            broker.stop()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--intervals", default="10,100,1000")
    parser.add_argument("--tail", type=int, default=0)
    parser.add_argument("--max", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-order", action="store_true",
                        help="with --max: acknowledge every message at once (none held back)")
    parser.add_argument("--b-subscription", action="store_true",
                        help="with --max: the plain run's b holds a durable subscription too")
    parser.add_argument("--perf-b", metavar="DIR",
                        help="with --max: `perf record -g` broker b during each measured window")
    parser.add_argument("--strace-b", metavar="DIR",
                        help="with --max: `strace -c -f` broker b during each measured window")
    parser.add_argument("--callgrind-b", metavar="DIR",
                        help="with --max: run broker b under callgrind and the load at --rate "
                             "msg/s; prints b's instructions per message over the window")
    parser.add_argument("--callgrind-a", metavar="DIR",
                        help="with --max: the same as --callgrind-b for broker a, the sender")
    options = parser.parse_args()
    if options.callgrind_a and options.callgrind_b:
        parser.error("--callgrind-a and --callgrind-b: one broker at a time")
    binary = os.path.abspath(options.binary)
    if options.max:
        max_run(binary, options)
        return
    if options.tail:
        with tempfile.TemporaryDirectory() as root:
            tail_run(binary, root, options)
        return
    for interval in (int(value) for value in options.intervals.split(",")):
        with tempfile.TemporaryDirectory() as root:
            failover_run(binary, root, interval, options)
    with tempfile.TemporaryDirectory() as root:
        cost_run(binary, root, options)


if __name__ == "__main__":
    main()
