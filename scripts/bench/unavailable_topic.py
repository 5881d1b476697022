"""How long the official client takes to learn that a topic cannot be loaded: produce to a topic,
stop the broker, overwrite the magic of the topic's segments, start it again, then time N
subscribe attempts (each ends with the broker's error, or the client's operation timeout).
Usage: compat/.venv/bin/python scripts/bench/unavailable_topic.py target/debug/meridian [attempts, default 5]"""
import pathlib, subprocess, sys, tempfile, time, urllib.request

import pulsar

binary = sys.argv[1]
attempts = int(sys.argv[2]) if len(sys.argv) > 2 else 5
work = pathlib.Path(tempfile.mkdtemp(prefix="unavailable-topic-"))
ports = ("16771", "18771")


def start():
    process = subprocess.Popen(
        [binary, "standalone", "--data-dir", str(work / "data"), "--broker-port", ports[0], "--web-port", ports[1]],
        stderr=open(work / "broker.log", "a"),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/admin/v2/brokers/health", timeout=1)
            return process
        except OSError:
            time.sleep(0.05)
    raise SystemExit("broker not ready; log: %s" % (work / "broker.log"))


def client():
    logger = pulsar.FileLogger(pulsar.LoggerLevel.Warn, str(work / "client.log"))
    return pulsar.Client(f"pulsar://127.0.0.1:{ports[0]}", operation_timeout_seconds=30, logger=logger)


broker = start()
first = client()
first.create_producer("broken").send(b"x")
first.close()
broker.terminate()
broker.wait()
for segment in (work / "data" / "storage" / "logs").glob("*broken*/*.segment"):
    with open(segment, "r+b") as file:
        file.write(b"GARBAGE!")
broker = start()
second = client()
results = []
for _ in range(attempts):
    started = time.monotonic()
    try:
        second.subscribe("broken", "sub")
        results.append("subscribed?!")
    except pulsar.PulsarException as error:
        results.append("%s after %.1f ms" % (type(error).__name__, (time.monotonic() - started) * 1000))
second.close()
broker.terminate()
broker.wait()
errors = sum(" ERROR " in line for line in open(work / "broker.log"))
print("subscribe attempts:", ", ".join(results))
print("broker ERROR lines:", errors)
