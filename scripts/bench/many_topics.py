"""RSS of a broker serving N topics, each with a consumer and a producer (official Python client),
then after one message on each. Usage: many_topics.py SERVICE_URL BROKER_PID N
(run with the compat virtualenv: compat/.venv/bin/python)."""
import pulsar, sys, time, os
url, pid, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def rss():
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS'): return int(line.split()[1]) / 1024
base = rss()
c = pulsar.Client(url, operation_timeout_seconds=60, io_threads=2, message_listener_threads=1)
t = time.time()
producers, consumers = [], []
for i in range(n):
    topic = 'tenk-%d' % i
    consumers.append(c.subscribe(topic, 's', receiver_queue_size=10))
    producers.append(c.create_producer(topic, batching_enabled=False))
    if i % 2000 == 1999: print('%d topics, %.0fs, RSS %.1f MiB' % (i + 1, time.time() - t, rss()), flush=True)
with_clients = rss()
for p in producers: p.send_async(b'x' * 100, None)
for p in producers: p.flush()
got = 0
for cons in consumers:
    m = cons.receive(30000); cons.acknowledge(m); got += 1
flowing = rss()
print('baseline %.1f MiB; with %d topics, producers and subscriptions %.1f MiB (growth %.1f); after one message on each (%d received) %.1f MiB (growth %.1f)' % (base, n, with_clients, with_clients - base, got, flowing, flowing - base))
c.close()
