"""Startup time to accepting connections and idle RSS of `meridian standalone` (5 runs on empty
data directories). Usage: python3 scripts/bench/startup.py target/release/meridian"""
import subprocess, socket, time, sys, os, shutil, statistics
binary = sys.argv[1]
times = []; rss = []
for i in range(5):
    d = '/tmp/startup-%d' % i
    shutil.rmtree(d, ignore_errors=True)
    t = time.perf_counter()
    p = subprocess.Popen([binary, 'standalone', '--data-dir', d, '--broker-port', '16760', '--web-port', '18760'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            socket.create_connection(('127.0.0.1', 16760), timeout=0.01).close(); break
        except OSError:
            time.sleep(0.0005)
    times.append((time.perf_counter() - t) * 1000)
    time.sleep(1.0)
    with open('/proc/%d/status' % p.pid) as f:
        for line in f:
            if line.startswith('VmRSS'): rss.append(int(line.split()[1]) / 1024)
    p.terminate(); p.wait()
print('startup to accepting connections (ms): median %.1f, all %s' % (statistics.median(times), ['%.1f' % x for x in times]))
print('idle RSS (MiB): median %.1f, all %s' % (statistics.median(rss), ['%.1f' % x for x in rss]))
