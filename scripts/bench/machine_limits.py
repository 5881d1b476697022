"""Machine limits for docs/BENCHMARKS.md: raw durable write bandwidth (1 MiB write + fdatasync,
5 s) and loopback TCP bandwidth (1 MiB sendall over one connection, 5 s). PROBE_DIR: where to
write (default target/, which must be on the disk under test)."""
import os, time, socket, threading
# Raw durable sequential write bandwidth: 1 MiB writes, fdatasync after each.
path = os.path.join(os.environ.get('PROBE_DIR', 'target'), 'limits-probe')
fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
buf = b'\xa5' * (1 << 20)
t = time.time(); n = 0
while time.time() - t < 5:
    os.write(fd, buf); os.fdatasync(fd); n += 1
el = time.time() - t
os.close(fd); os.unlink(path)
print('raw durable write, 1 MiB + fdatasync: %.0f MB/s' % (n * (1 << 20) / el / 1e6))
# Loopback TCP bandwidth, 1 MiB sends.
server = socket.socket(); server.bind(('127.0.0.1', 0)); server.listen(1)
port = server.getsockname()[1]
total = [0]
def sink():
    conn, _ = server.accept()
    while True:
        data = conn.recv(1 << 20)
        if not data: break
        total[0] += len(data)
th = threading.Thread(target=sink); th.start()
client = socket.create_connection(('127.0.0.1', port))
t = time.time()
while time.time() - t < 5:
    client.sendall(buf)
client.close(); th.join()
el = time.time() - t
print('loopback TCP, one connection, 1 MiB sends: %.0f MB/s' % (total[0] / el / 1e6))
