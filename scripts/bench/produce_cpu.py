#!/usr/bin/env python3
"""Broker CPU per message on the publish path (issue 16), with an independent load generator.

Each round starts a fresh `meridian standalone` on a temporary data directory (default durable
policy: every receipt after fdatasync) and runs `examples/pulsar_produce` (the Rust `pulsar`
crate: batches of up to 1000 messages / 128 KiB, 1 KiB messages, produce only) against it. The
broker's user + system CPU time, context switches and minor faults come from /proc/<pid>
over the measured window. Optionally one more round runs under `strace -c -f` (syscalls by name,
per entry) or `perf record -g` (a profile).

    python3 scripts/bench/produce_cpu.py                      # builds release, 3 rounds
    python3 scripts/bench/produce_cpu.py --no-build --rounds 5 --duration 10
    python3 scripts/bench/produce_cpu.py --no-build --rounds 0 --strace
    python3 scripts/bench/produce_cpu.py --no-build --rounds 0 --perf /tmp/pt-perf/perf.data
    python3 scripts/bench/produce_cpu.py --no-build --meridian /tmp/meridian-before   # another build
    python3 scripts/bench/produce_cpu.py --no-build --fill 200000     # consume: CPU per delivered message
    python3 scripts/bench/produce_cpu.py --no-build --rate 40000       # produce + consume: p50/p99 latency
    python3 scripts/bench/produce_cpu.py --no-build --partitions 16    # one topic of 16 partitions
    python3 scripts/bench/produce_cpu.py --no-build --batch-max-messages 20   # smaller batches
    python3 scripts/bench/produce_cpu.py --no-build --topics 100 --batch-max-delay-ms 200   # fuller batches
    python3 scripts/bench/produce_cpu.py --no-build --pulsar-lite <pulsar-lite binary>
        # each round also runs pulsar-lite (which does not fsync) under the same generator,
        # right after Meridian; prints both and Meridian's CPU per message over pulsar-lite's

pulsar-lite is PyPI's `pulsar-lite` (0.2.0, as `scripts/test.sh` installs it into
target/pulsar-lite-venv); its binary is `bin/pulsar-lite` inside the installed package:

    python3 -m venv /tmp/pl && /tmp/pl/bin/pip install pulsar-lite==0.2.0
    /tmp/pl/bin/python -c 'import os, pulsar_lite; print(os.path.join(os.path.dirname(pulsar_lite.__file__), "bin", "pulsar-lite"))'

Temporary directories go under --tmp (default /tmp/pt-perf) and are removed afterwards.
"""
import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time, urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for_port(port, process, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit('broker exited with %s' % process.returncode)
        try:
            socket.create_connection(('127.0.0.1', port), timeout=0.1).close()
            return
        except OSError:
            time.sleep(0.02)
    sys.exit('broker did not accept connections within %d s' % timeout)


def round_(args, attach=None, wrapper=(), lite=False):
    """One round against a fresh broker (pulsar-lite's binary, `args.pulsar_lite`, if `lite`).
    `attach(pid)` starts a tracer for the window and returns a function that stops it;
    `wrapper` runs the broker under another program."""
    work = tempfile.mkdtemp(prefix='produce-cpu-', dir=args.tmp)
    broker_port, web_port = free_port(), free_port()
    if lite:
        config = os.path.join(work, 'pulsar-lite.toml')
        with open(config, 'w') as f:
            f.write('[metrics]\nenabled = false\n')
        command = [args.pulsar_lite, '--config', config, '--addr', '127.0.0.1:%d' % broker_port,
                   '--db-path', os.path.join(work, 'db')]
    else:
        command = [args.meridian or os.path.join(args.target, 'meridian'), 'standalone',
                   '--data-dir', os.path.join(work, 'data'),
                   '--broker-port', str(broker_port), '--web-port', str(web_port)]
    broker = subprocess.Popen(
        list(wrapper) + command,
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, 'broker.log'), 'w'))
    try:
        wait_for_port(broker_port, broker, timeout=120)
        if args.partitions:
            # Each of the generator's topics becomes a partitioned topic; the `pulsar` crate's
            # producer sends its messages to the partitions in turn.
            for topic in range(args.topics):
                request = urllib.request.Request(
                    'http://127.0.0.1:%d/admin/v2/persistent/public/default/produce-cpu-%d/partitions'
                    % (web_port, topic), data=str(args.partitions).encode(), method='PUT',
                    headers={'Content-Type': 'application/json'})
                urllib.request.urlopen(request, timeout=30).close()
        generator = subprocess.Popen(
            [os.path.join(args.target, 'examples', 'pulsar_produce'),
             '--url', 'pulsar://127.0.0.1:%d' % broker_port, '--broker-pid', str(broker.pid),
             '--size', str(args.size), '--topics', str(args.topics),
             '--warmup', str(args.warmup), '--duration', str(args.duration),
             '--fill', str(args.fill), '--rate', str(args.rate),
             '--batch-max-messages', str(args.batch_max_messages),
             '--batch-max-delay-ms', str(args.batch_max_delay_ms)],
            stdout=subprocess.PIPE, text=True)
        stop_tracer = None
        if attach:
            time.sleep(args.warmup)
            stop_tracer = attach(broker.pid)
            time.sleep(args.duration)
            stop_tracer()
        output, _ = generator.communicate(timeout=args.warmup + args.duration + 120)
        if generator.returncode != 0:
            sys.exit('load generator failed (%s)' % generator.returncode)
        return json.loads(output.strip().splitlines()[-1])
    finally:
        stop(broker)
        shutil.rmtree(work, ignore_errors=True)


def stop(broker):
    """Stops a broker started by a round: SIGTERM, then SIGKILL after 30 s."""
    broker.send_signal(signal.SIGTERM)
    try:
        broker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        broker.kill()
        broker.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--duration', type=float, default=10)
    parser.add_argument('--warmup', type=float, default=3)
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--topics', type=int, default=1)
    parser.add_argument('--batch-max-messages', type=int, default=1000,
                        help="the generator's batches hold at most this many messages (and 128 KiB)")
    parser.add_argument('--batch-max-delay-ms', type=float, default=1,
                        help="the generator's producers send a batch at the latest this long after its first "
                             "message")
    parser.add_argument('--partitions', type=int, default=0,
                        help='make each topic a partitioned topic of this many partitions')
    parser.add_argument('--fill', type=int, default=0,
                        help='consume mode: produce FILL messages unmeasured, then measure one consumer per '
                             'topic reading them back from the earliest position (cached entries)')
    parser.add_argument('--rate', type=float, default=0,
                        help='latency mode: one consumer per topic reads while producers send RATE msg/s in '
                             'total; reports publish-to-delivery p50/p99')
    parser.add_argument('--no-build', action='store_true')
    parser.add_argument('--target', default=os.path.join(ROOT, 'target', 'release'))
    parser.add_argument('--meridian', help='the broker binary (default: <target>/meridian)')
    parser.add_argument('--tmp', default='/tmp/pt-perf')
    parser.add_argument('--pulsar-lite', metavar='BIN',
                        help="also run each round against pulsar-lite's binary BIN, right after Meridian")
    parser.add_argument('--strace', action='store_true', help='one more round under strace -c -f')
    parser.add_argument('--perf', metavar='FILE', help='one more round under perf record -g into FILE')
    parser.add_argument('--callgrind', action='store_true',
                        help='one more round with the broker under callgrind: user-space instructions per message')
    args = parser.parse_args()
    if args.pulsar_lite and args.partitions:
        parser.error('--partitions creates the topics through the admin API, which pulsar-lite has not')
    os.makedirs(args.tmp, exist_ok=True)
    if not args.no_build:
        subprocess.run(['cargo', 'build', '--release', '-p', 'meridian', '--bin', 'meridian',
                        '--example', 'pulsar_produce'], cwd=ROOT, check=True)

    results, lite_results = [], []
    for index in range(args.rounds):
        result = round_(args)
        results.append(result)
        print('round %d: %s' % (index + 1, json.dumps(result)), flush=True)
        if args.pulsar_lite:
            result = round_(args, lite=True)
            lite_results.append(result)
            print('round %d, pulsar-lite: %s' % (index + 1, json.dumps(result)), flush=True)
    for name, runs in (('broker', results), ('pulsar-lite', lite_results)):
        if runs:
            cpu = [r['broker_cpu_us_per_msg'] for r in runs]
            print('%s CPU µs/msg: %s (median %.3f, spread %.0f%%)' % (
                name, ', '.join('%.3f' % c for c in cpu), statistics.median(cpu),
                100 * (max(cpu) - min(cpu)) / statistics.median(cpu)))
    if results and lite_results:
        ratios = [m['broker_cpu_us_per_msg'] / l['broker_cpu_us_per_msg']
                  for m, l in zip(results, lite_results)]
        print('Meridian / pulsar-lite, CPU per message, round by round: %s (median %.2f)' % (
            ', '.join('%.2f' % r for r in ratios), statistics.median(ratios)))

    if args.strace:
        counts = os.path.join(args.tmp, 'strace-%d.txt' % os.getpid())

        def attach(pid):
            tracer = subprocess.Popen(['strace', '-c', '-f', '-o', counts, '-p', str(pid)],
                                      stderr=subprocess.DEVNULL)
            return lambda: (tracer.send_signal(signal.SIGINT), tracer.wait())
        result = round_(args, attach)
        entries = max(result['entries'], 1)
        print('strace round: %s' % json.dumps(result))
        print('syscalls per entry (strace -c -f over the window; the broker runs slower traced):')
        with open(counts) as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != 'total':
                    calls = int(fields[3])
                    print('  %-16s %8.2f' % (fields[-1], calls / entries))
        os.remove(counts)

    if args.callgrind:
        out = os.path.join(args.tmp, 'callgrind-%d.out' % os.getpid())

        def attach(pid):
            subprocess.run(['callgrind_control', '-z', str(pid)], check=True, stdout=subprocess.DEVNULL)
            return lambda: subprocess.run(['callgrind_control', '-d', str(pid)], check=True,
                                          stdout=subprocess.DEVNULL)
        result = round_(args, attach, ['valgrind', '--tool=callgrind', '--callgrind-out-file=' + out + '.%p'])
        instructions = 0
        prefix = os.path.basename(out) + '.'
        for name in os.listdir(args.tmp):
            if name.startswith(prefix):
                path = os.path.join(args.tmp, name)
                # The window (zeroed, then dumped) is dump number 1: `<out>.<pid>.1`.
                if name[len(prefix):].endswith('.1'):
                    with open(path) as f:
                        for line in f:
                            if line.startswith(('summary:', 'totals:')):
                                instructions = int(line.split()[1])
                os.remove(path)
        print('callgrind round: %s' % json.dumps(result))
        print('user-space instructions per message in the window: %.0f (per entry: %.0f)' % (
            instructions / max(result['messages'], 1), instructions / max(result['entries'], 1)))

    if args.perf:
        def attach(pid):
            recorder = subprocess.Popen(['perf', 'record', '-e', 'cpu-clock', '-F', '999', '-g',
                                         '-o', args.perf, '-p', str(pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return lambda: (recorder.send_signal(signal.SIGINT), recorder.wait())
        result = round_(args, attach)
        print('perf round: %s' % json.dumps(result))
        print('profile in %s: perf report -i %s --no-children --sort symbol --stdio' % (args.perf, args.perf))


if __name__ == '__main__':
    main()
