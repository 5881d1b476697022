#!/usr/bin/env python3
"""The fsync-bound case of issue 16: many producers, each sending one unbatched 1 KiB message
at a time (send, wait for the receipt, send the next), against the raw `pwrite + fdatasync`
rate at the batch size the broker achieves.

Each round starts a fresh `meridian standalone` (default durable policy: every receipt after
fdatasync) on a data directory under --tmp, runs

    meridian perf produce --producers 64 --batch-max-messages 0 --max-pending 1 --size 1024

against it, counting the broker's `fdatasync` calls over the perf run with
`perf stat -e syscalls:sys_enter_fdatasync -p PID` (a tracepoint count: no slowdown), and
the bytes its storage threads wrote from /proc/PID/task/TID/io: under the default policy
each flush is one `pwritev` of the batch and one `fdatasync`, and the only other writes of
those threads are 8-byte `eventfd` writes that wake the runtime when a flush completes
appends (`syscw` beyond the fsyncs), which are subtracted. Thread names are cut to 15 bytes,
so the flush, maintenance and checkpoint threads all read `meridian-storag`; in a
produce-only run without subscriptions the last two write nothing. Then, on the same file
system, a raw loop writes batches of exactly the broker's bytes per fsync with `pwrite` +
`fdatasync` for as long as the broker round measured; its rate of fsyncs times the broker's
messages per fsync is the raw rate at the same batch size. The broker's figure is
`meridian perf`'s publish rate over the measured window; the fsync counts cover the whole
perf run (warmup included), so messages per fsync is `sent` over fsyncs.

    python3 scripts/bench/fsync_bound.py                        # builds release, 3 rounds
    python3 scripts/bench/fsync_bound.py --no-build --rounds 1 --meridian /tmp/meridian-before
    python3 scripts/bench/fsync_bound.py --no-build --producers 1   # a lone producer's latency

Prints one JSON line per round and the ratio broker msg/s / raw msg/s.
"""
import argparse, json, os, shutil, signal, subprocess, tempfile, time

from produce_cpu import free_port, stop, wait_for_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def flush_thread_io(pid):
    """(write syscalls, bytes written) of the broker's storage threads so far."""
    calls = written = 0
    for tid in os.listdir('/proc/%d/task' % pid):
        try:
            with open('/proc/%d/task/%s/comm' % (pid, tid)) as f:
                if not f.read().startswith('meridian-storag'):
                    continue
            with open('/proc/%d/task/%s/io' % (pid, tid)) as f:
                fields = dict(line.split(': ') for line in f.read().splitlines())
        except OSError:
            continue
        calls += int(fields['syscw'])
        written += int(fields['wchar'])
    return calls, written


def thread_counters(pid):
    """{thread name: [threads, voluntary switches, involuntary switches, CPU ticks]} of the
    process's threads so far (names are cut to 15 bytes by the kernel)."""
    counters = {}
    for tid in os.listdir('/proc/%d/task' % pid):
        try:
            with open('/proc/%d/task/%s/status' % (pid, tid)) as f:
                status = dict(line.split(':\t', 1) for line in f.read().splitlines() if ':\t' in line)
            with open('/proc/%d/task/%s/stat' % (pid, tid)) as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        name = status['Name'].strip()
        entry = counters.setdefault(name, [0, 0, 0, 0])
        entry[0] += 1
        entry[1] += int(status['voluntary_ctxt_switches'])
        entry[2] += int(status['nonvoluntary_ctxt_switches'])
        entry[3] += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return counters


def per_thread(before, after, messages):
    """Switches and CPU per message of each thread group between two `thread_counters`."""
    tick_us = 1e6 / os.sysconf('SC_CLK_TCK')
    report = {}
    for name, (threads, voluntary, involuntary, ticks) in sorted(after.items()):
        was = before.get(name, [0, 0, 0, 0])
        report[name] = {
            'threads': threads,
            'voluntary_per_msg': round((voluntary - was[1]) / messages, 3),
            'involuntary_per_msg': round((involuntary - was[2]) / messages, 3),
            'cpu_us_per_msg': round((ticks - was[3]) * tick_us / messages, 3),
        }
    return report


def count_fdatasyncs(pid, directory):
    """Starts counting the process's fdatasync calls; returns a function that stops and
    returns the count."""
    out = os.path.join(directory, 'perf-stat.txt')
    counter = subprocess.Popen(['perf', 'stat', '-x', ',', '-o', out, '-e',
                                'syscalls:sys_enter_fdatasync', '-p', str(pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # perf attaches

    def stop():
        counter.send_signal(signal.SIGINT)
        counter.wait()
        with open(out) as f:
            lines = [line for line in f if 'sys_enter_fdatasync' in line]
        os.remove(out)
        return int(lines[0].split(',')[0])
    return stop


def raw_rate(directory, batch_bytes, seconds):
    """fsyncs per second of a `pwrite` (appending) + `fdatasync` loop with `batch_bytes`."""
    path = os.path.join(directory, 'fsync-bound-raw.dat')
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = os.urandom(batch_bytes)
        rounds, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            os.pwrite(fd, data, rounds * batch_bytes)
            os.fdatasync(fd)
            rounds += 1
        return rounds / (time.perf_counter() - started)
    finally:
        os.close(fd)
        os.remove(path)


def round_(args):
    work = tempfile.mkdtemp(prefix='fsync-bound-', dir=args.tmp)
    binary = args.meridian or os.path.join(args.target, 'meridian')
    broker_port, web_port = free_port(), free_port()
    broker = subprocess.Popen(
        [binary, 'standalone', '--data-dir', os.path.join(work, 'data'),
         '--broker-port', str(broker_port), '--web-port', str(web_port)],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, 'broker.log'), 'w'))
    try:
        wait_for_port(broker_port, broker)
        stop_counting = count_fdatasyncs(broker.pid, work)
        before = flush_thread_io(broker.pid)
        threads_before = thread_counters(broker.pid)
        perf = subprocess.run(
            [binary, 'perf', 'produce', '--url', 'pulsar://127.0.0.1:%d' % broker_port,
             '--admin-url', 'http://127.0.0.1:%d' % web_port, '--topic-prefix', 'fsync-bound',
             '--producers', str(args.producers), '--batch-max-messages', '0',
             '--max-pending', '1', '--size', str(args.size), '--warmup', str(args.warmup),
             '--duration', str(args.duration), '--broker-pid', str(broker.pid),
             '--output', 'json'],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, check=True)
        after = flush_thread_io(broker.pid)
        threads_after = thread_counters(broker.pid)
        fsyncs = max(stop_counting(), 1)
        summary = json.loads(perf.stdout)
        eventfd_writes = max(after[0] - before[0] - fsyncs, 0)
        messages_per_fsync = summary['sent'] / fsyncs
        bytes_per_fsync = (after[1] - before[1] - 8 * eventfd_writes) / fsyncs
        raw_fsyncs_per_s = raw_rate(work, max(int(bytes_per_fsync), 1), args.duration)
        broker_rate = summary['publish']['msg_per_s']
        raw_messages_per_s = raw_fsyncs_per_s * messages_per_fsync
        cpu = summary['broker_cpu'] or {}
        per = cpu.get('per_message') or {}
        return {
            'msg_per_s': round(broker_rate),
            'fsyncs': fsyncs,
            'messages_per_fsync': round(messages_per_fsync, 2),
            'bytes_per_fsync': round(bytes_per_fsync),
            'raw_fsyncs_per_s': round(raw_fsyncs_per_s),
            'raw_msg_per_s_at_that_batch': round(raw_messages_per_s),
            'ratio': round(broker_rate / raw_messages_per_s, 3),
            'publish_ms_p50': summary['publish_latency_ms']['p50'],
            'publish_ms_p99': summary['publish_latency_ms']['p99'],
            'broker_us_per_msg': cpu.get('us_per_message'),
            'broker_switches_per_msg': [per.get('voluntary_switches'), per.get('involuntary_switches')],
            'fsyncs_per_msg': round(fsyncs / summary['sent'], 3),
            # Over the whole perf run (warm-up included), per message sent.
            'threads': per_thread(threads_before, threads_after, summary['sent']) if args.threads else None,
        }
    finally:
        stop(broker)
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--producers', type=int, default=64)
    parser.add_argument('--size', type=int, default=1024)
    parser.add_argument('--duration', type=int, default=10)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', action='store_true',
                        help="add each broker thread group's switches and CPU per message")
    parser.add_argument('--no-build', action='store_true')
    parser.add_argument('--target', default=os.path.join(ROOT, 'target', 'release'))
    parser.add_argument('--meridian', help='the broker and perf binary (default: <target>/meridian)')
    parser.add_argument('--tmp', default='/tmp/pt-perf', help='data directories (on the disk to measure)')
    args = parser.parse_args()
    os.makedirs(args.tmp, exist_ok=True)
    if not args.no_build:
        subprocess.run(['cargo', 'build', '--release', '-p', 'meridian', '--bin', 'meridian'],
                       cwd=ROOT, check=True)
    ratios = []
    for index in range(args.rounds):
        result = round_(args)
        ratios.append(result['ratio'])
        print('round %d: %s' % (index + 1, json.dumps(result)), flush=True)
    if ratios:
        print('broker / raw at the same batch size: %s' % ', '.join('%.0f%%' % (100 * r) for r in ratios))


if __name__ == '__main__':
    main()
