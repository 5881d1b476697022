"""What the lookup front door adds to a lookup: one `meridian standalone` and one `meridian
lookup` in front of it; LOOKUPs over one raw connection, first one at a time (latency), then
2,000 sent at once over 10 topics (throughput), against the broker and against the front door,
two rounds each. Usage: python3 scripts/bench/lookup_front_door.py target/release/meridian"""
import os, shutil, signal, socket, subprocess, sys, tempfile, time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "compat"))
import pulsar_frames as frames  # noqa: E402
from broker_process import free_port  # noqa: E402

binary = sys.argv[1]
count = 2000
work = tempfile.mkdtemp(prefix="lookup-bench-")
broker_port, web_port, door_port, door_web_port = (free_port() for _ in range(4))
broker = subprocess.Popen(
    [binary, "standalone", "--data-dir", os.path.join(work, "data"), "--broker-port",
     str(broker_port), "--web-port", str(web_port)],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
door = subprocess.Popen(
    [binary, "lookup", "--clusters", f"http://127.0.0.1:{web_port}", "--listen",
     f"127.0.0.1:{door_port}", "--web-listen", f"127.0.0.1:{door_web_port}"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def measure(port, label):
    with frames.RawConnection(port) as connection:
        connection.handshake()
        connection.request(frames.lookup_frame("persistent://public/default/b", 1),
                           frames.LOOKUP_RESPONSE)  # warms the front door's cache
        started = time.monotonic()
        for i in range(count):
            connection.request(frames.lookup_frame("persistent://public/default/b", i + 2),
                               frames.LOOKUP_RESPONSE)
        one_at_a_time = time.monotonic() - started
        started = time.monotonic()
        connection.send(b"".join(
            frames.lookup_frame(f"persistent://public/default/b-{i % 10}", i + 10_000)
            for i in range(count)))
        for _ in range(count):
            reply = connection.reply()
            assert reply.command_type == frames.LOOKUP_RESPONSE and reply.first(3) == 1, reply
        at_once = time.monotonic() - started
    print(f"{label}: one at a time {one_at_a_time / count * 1e6:.0f} us per lookup; "
          f"{count} at once {count / at_once:.0f} lookups/s")


try:
    while not (accepts(broker_port) and accepts(door_port)):
        time.sleep(0.05)
    for _ in range(2):
        measure(broker_port, "broker     ")
        measure(door_port, "front door ")
finally:
    for process in (door, broker):
        process.send_signal(signal.SIGTERM)
        process.wait(20)
    shutil.rmtree(work, ignore_errors=True)
