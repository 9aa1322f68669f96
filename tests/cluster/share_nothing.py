"""A Ray cluster whose nodes share nothing but a network, an object store and a tracking server,
built on this machine for the tests (we run as root).

    hosts = Network.create()                 # a bridge with this machine on .1
    services = Services.start(hosts)         # moto's S3 server and an MLflow server on .1
    cluster = Cluster.start(hosts, services) # head .2 (no CPUs), workers .3 and .4 (1 CPU each)
    ...
    cluster.stop(); services.stop(); hosts.remove()

Each node is `ray start` in a network namespace of its own (a veth pair into the bridge, its
own address), with a host name of its own that resolves to that address (as a pod's does: gloo
finds its interface so), and a mount namespace of its own, where empty tmpfs cover the project checkout
(its `.venv` bound back in, so that Python and the dependencies are there but not our code),
/tmp (the driver's folders, the other nodes' Ray sessions) and /dev/shm, and HOME points into
its private /tmp. Code reaches a node only through a job's runtime environment, data and
checkpoints only through the S3 server, metrics only through the MLflow server. Traffic goes
only to the addresses made here.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
BIN = VENV / "bin"
BUCKET = "resnet-pipe-test"
NODES = ("head", "w1", "w2")
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def sh(*words: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(words, check=check, capture_output=True, text=True)


def kill_all(namespace: str) -> None:
    """SIGKILLs every process in a network namespace."""
    for pid in sh("ip", "netns", "pids", namespace, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Network:
    """A bridge with this machine's address on it, and a network namespace a node."""

    tag: str
    subnet: str  # "10.213.N"
    namespaces: dict[str, str] = field(default_factory=dict)

    @property
    def bridge(self) -> str:
        return f"rpb{self.tag}"

    @property
    def host_ip(self) -> str:
        return f"{self.subnet}.1"

    def ip(self, node: str) -> str:
        return f"{self.subnet}.{2 + NODES.index(node)}"

    @classmethod
    def create(cls) -> Network:
        tag = secrets.token_hex(2)
        taken = sh("ip", "-4", "addr").stdout
        third = next(n for n in range(213, 250) if f"10.{n}." not in taken)
        net = cls(tag, f"10.{third}.{int(tag, 16) % 250 + 1}")
        try:
            sh("ip", "link", "add", net.bridge, "type", "bridge")
            sh("ip", "addr", "add", f"{net.host_ip}/24", "dev", net.bridge)
            sh("ip", "link", "set", net.bridge, "up")
            for i, node in enumerate(NODES):
                ns, outside, inside = f"rp{tag}-{node}", f"rp{tag}{i}h", f"rp{tag}{i}n"
                sh("ip", "netns", "add", ns)
                net.namespaces[node] = ns
                sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
                sh("ip", "link", "set", inside, "netns", ns)
                sh("ip", "link", "set", outside, "master", net.bridge, "up")
                sh("ip", "-n", ns, "addr", "add", f"{net.ip(node)}/24", "dev", inside)
                sh("ip", "-n", ns, "link", "set", inside, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
        except BaseException:
            net.remove()
            raise
        return net

    def remove(self) -> None:
        for i in range(len(NODES)):  # a veth pair goes with either end; the namespace's goes late
            sh("ip", "link", "del", f"rp{self.tag}{i}h", check=False)
        for ns in self.namespaces.values():
            kill_all(ns)
            sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        """Namespaces and links of this network still there."""
        found = [line for line in sh("ip", "netns", "list").stdout.splitlines() if f"rp{self.tag}-" in line]
        found += [line for line in sh("ip", "-o", "link").stdout.splitlines() if f"rp{self.tag}" in line
                  or self.bridge in line]  # fmt: skip
        return found


def _wait_for(url: str, seconds: float, process: subprocess.Popen, headers: dict | None = None) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up (exit code {process.poll()})") from None
            time.sleep(1)


@dataclass
class Services:
    """moto's S3 server and an MLflow tracking server (artifacts to the S3 server), on the
    bridge's address of this machine: the store and the tracking server a cluster would have."""

    s3_url: str
    tracking_uri: str
    processes: list[subprocess.Popen]
    folder: Path

    @classmethod
    def start(cls, net: Network, folder: Path) -> Services:
        from pipeline.system import free_port

        folder.mkdir(parents=True, exist_ok=True)
        s3_port, mlflow_port = free_port(), free_port()
        s3_url = f"http://{net.host_ip}:{s3_port}"
        env = os.environ | CREDENTIALS | {"AWS_ENDPOINT_URL": s3_url}
        log = (folder / "services.log").open("w")
        moto = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", net.host_ip, "-p", str(s3_port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
        )  # fmt: skip
        services = cls(s3_url, f"http://{net.host_ip}:{mlflow_port}", [moto], folder)
        try:
            _wait_for(s3_url, 60, moto)
            import boto3

            boto3.client("s3", endpoint_url=s3_url, **_boto(CREDENTIALS)).create_bucket(Bucket=BUCKET)
            mlflow = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--host", net.host_ip, "--port", str(mlflow_port),
                 "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                 "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--workers", "1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=folder,
            )  # fmt: skip
            services.processes.append(mlflow)
            _wait_for(f"{services.tracking_uri}/health", 120, mlflow)
        except BaseException:
            services.stop()
            raise
        return services

    def client_env(self) -> dict[str, str]:
        """What a user's machine sets to use the store and the tracking server."""
        return CREDENTIALS | {"AWS_ENDPOINT_URL": self.s3_url, "MLFLOW_TRACKING_URI": self.tracking_uri}

    def objects(self, prefix: str) -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_url, **_boto(CREDENTIALS))
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _boto(credentials: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": credentials["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": credentials["AWS_SECRET_ACCESS_KEY"],
        "region_name": credentials["AWS_DEFAULT_REGION"],
    }


@dataclass
class Cluster:
    """`ray start` on each node: the head (no CPUs, as a KubeRay head is set up to take no work)
    and two workers of one CPU each, token authentication on, as a production cluster has it."""

    net: Network
    token: str
    stage: Path
    nodes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def job_server(self) -> str:
        return f"http://{self.net.ip('head')}:8265"

    @property
    def ray_client(self) -> str:
        return f"ray://{self.net.ip('head')}:10001"

    def client_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @classmethod
    def start(cls, net: Network, services: Services) -> Cluster:
        stage = Path(f"/run/resnet-pipe-test-{net.tag}")
        stage.mkdir(parents=True)
        cluster = cls(net, secrets.token_hex(16), stage)
        env = {
            "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp/home",
            "LANG": "C.UTF-8",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stopped at once: its 30 s drain is for pods
            # a node that stops answering is found dead after 3 missed checks of 1 s (Ray's default
            # takes about 30 s, for networks less certain than a bridge on one machine)
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            "AWS_ENDPOINT_URL": services.s3_url,  # the node's own settings, as a Secret gives a pod
            **CREDENTIALS,
            **cluster.client_env(),
        }
        head = net.ip("head")
        common = ["--object-store-memory=100000000", "--disable-usage-stats", "--block"]
        commands = {
            "head": ["--head", f"--node-ip-address={head}", "--port=6379", f"--dashboard-host={head}",
                     "--dashboard-port=8265", "--ray-client-server-port=10001", "--num-cpus=0"],
            "w1": [f"--address={head}:6379", f"--node-ip-address={net.ip('w1')}", "--num-cpus=1"],
            "w2": [f"--address={head}:6379", f"--node-ip-address={net.ip('w2')}", "--num-cpus=1"],
        }  # fmt: skip
        try:
            for node in NODES:
                cluster._start_node(node, ["ray", "start", *commands[node], *common], env)
                if node == "head":
                    _wait_for(f"{cluster.job_server}/api/version", 120, cluster.nodes["head"],
                              {"Authorization": f"Bearer {cluster.token}"})  # fmt: skip
            cluster.wait_for_nodes(3)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_node(self, node: str, command: list[str], env: dict[str, str]) -> None:
        venv_copy = self.stage / node
        venv_copy.mkdir()
        hide = f"""
set -e
mount --bind {VENV} {venv_copy}
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
mkdir -p {PROJECT}
mount -t tmpfs tmpfs {PROJECT}
mkdir -p {VENV} /tmp/home
mount --bind {venv_copy} {VENV}
hostname rp-{node}
printf '127.0.0.1 localhost\n{self.net.ip(node)} rp-{node}\n' > /tmp/hosts
mount --bind /tmp/hosts /etc/hosts
cd /tmp/home
exec {" ".join(command)} > /tmp/ray-start.log 2>&1
"""
        self.nodes[node] = subprocess.Popen(
            ["ip", "netns", "exec", self.net.namespaces[node],
             "unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", hide],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip

    def alive_nodes(self) -> int:
        request = urllib.request.Request(
            f"{self.job_server}/api/v0/nodes?limit=100", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            nodes = json.loads(answer.read())["data"]["result"]["result"]
        return sum(node["state"] == "ALIVE" for node in nodes)

    def wait_for_nodes(self, count: int, seconds: float = 120) -> None:
        deadline = time.monotonic() + seconds
        while True:
            try:
                if self.alive_nodes() == count:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach {count} live nodes")
            time.sleep(1)

    def kill(self, node: str) -> None:
        """The node's machine gone at once: every process of it SIGKILLed."""
        kill_all(self.net.namespaces[node])
        self.nodes[node].wait(timeout=30)

    def files(self, node: str) -> list[str]:
        """Every file on the node's own disk: its private /tmp and the empty folder over the project
        (the virtual environment bound in from this machine passed by)."""
        pid = str(self.nodes[node].pid)  # `ray start`: ip, unshare and sh exec into it
        words = ["find", "/tmp", str(PROJECT), "-path", str(VENV), "-prune", "-o", "-type", "f", "-print"]
        listed = sh("nsenter", "-t", pid, "-m", *words, check=False).stdout
        return sorted(set(listed.splitlines()))

    def stop(self) -> None:
        for process in self.nodes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)  # `ray start --block` stops what it started
        for node, process in self.nodes.items():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill(node)
        shutil.rmtree(self.stage, ignore_errors=True)
