"""Two `meridian standalone` clusters on free loopback ports for the benchmarks: start, stop,
SIGKILL, CPU time from /proc, and a namespace `t/ns` replicated between them (configured once on
a; Meridian propagates it to b)."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
            try:
                return response.status, json.loads(text) if text else None
            except ValueError:
                return response.status, text
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Broker:
    def __init__(self, binary, name, root, wrapper=()):
        """`wrapper`: a command the broker runs under (for example valgrind)."""
        self.binary, self.name, self.wrapper = binary, name, list(wrapper)
        self.data = os.path.join(root, name)
        self.port, self.web = free_port(), free_port()
        self.log = open(os.path.join(root, name + ".log"), "ab")
        self.process = None
        self.start()

    def start(self):
        self.process = subprocess.Popen(
            self.wrapper + [self.binary, "standalone", "--data-dir", self.data, "--cluster-name", self.name,
             "--broker-port", str(self.port), "--web-port", str(self.web)],
            stdout=self.log, stderr=self.log)
        deadline = time.time() + (120 if self.wrapper else 30)
        while time.time() < deadline:
            try:
                if http("GET", self.admin + "/admin/v2/brokers/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"broker {self.name} did not start")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def kill9(self):
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def cpu_seconds(self):
        """utime + stime of the broker process so far."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def cpu_split(self):
        """utime and stime of the broker process so far, apart."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    @property
    def url(self):
        return f"pulsar://127.0.0.1:{self.port}"

    @property
    def admin(self):
        return f"http://127.0.0.1:{self.web}"


def replicate_namespace(a, b, proxy=None):
    """Registers b on a (through `proxy` if given) and replicates `t/ns` between a and b."""
    entry = {"serviceUrl": b.admin, "brokerServiceUrl": b.url}
    if proxy is not None:
        entry.update({"proxyServiceUrl": proxy.url, "proxyProtocol": "SNI"})
    http("PUT", a.admin + "/admin/v2/clusters/b", entry)
    http("PUT", a.admin + "/admin/v2/tenants/t", {"adminRoles": [], "allowedClusters": ["a", "b"]})
    http("PUT", a.admin + "/admin/v2/namespaces/t/ns")
    http("POST", a.admin + "/admin/v2/namespaces/t/ns/replication", ["a", "b"])
    deadline = time.time() + 30
    while http("GET", b.admin + "/admin/v2/namespaces/t/ns/replication") != (200, ["a", "b"]):
        if time.time() > deadline:
            raise RuntimeError("configure-once did not reach b")
        time.sleep(0.1)
