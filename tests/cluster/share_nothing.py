"""A Ray cluster whose nodes share nothing but a network, an object store and a tracking server,
built on this machine for the tests (we run as root).

    with share_nothing(folder) as (net, services, cluster):
        # net: a bridge with this machine on .1; services: moto's S3 server and an MLflow
        # server on .1; cluster: head .2 (no CPUs), workers .3 and .4 (1 CPU each)
        user = User(folder / "user", services, cluster)   # `resnet-pipe ...` as a user types it
        with blocked(services.s3_port): ...               # faults: iptables, tc netem, kills

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

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

PROJECT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)
BIN = VENV / "bin"
BUCKET = "resnet-pipe-test"
NODES = ("head", "w1", "w2")
# moto takes any key; a fresh secret each session, which tests look for where it must not be
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": f"planted-s3-secret-{secrets.token_hex(8)}",
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
            services.start_mlflow()
        except BaseException:
            services.stop()
            raise
        return services

    @property
    def s3_port(self) -> int:
        return int(self.s3_url.rsplit(":", 1)[1])

    @property
    def mlflow_port(self) -> int:
        return int(self.tracking_uri.rsplit(":", 1)[1])

    def start_mlflow(self) -> None:
        """The MLflow server, on its database and artifact store (as they were, after a stop)."""
        host = self.tracking_uri.split("//")[1].rsplit(":", 1)[0]
        env = os.environ | CREDENTIALS | {"AWS_ENDPOINT_URL": self.s3_url}
        with (self.folder / "services.log").open("a") as log:
            mlflow = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--host", host, "--port", str(self.mlflow_port),
                 "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
                 "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--workers", "1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.folder,
            )  # fmt: skip
        self.processes.append(mlflow)
        _wait_for(f"{self.tracking_uri}/health", 120, mlflow)

    def stop_mlflow(self) -> None:
        """The MLflow server stopped as a restart stops it (SIGTERM, then SIGKILL after 30 s)."""
        mlflow = self.processes.pop()
        _stop(mlflow)

    def client_env(self) -> dict[str, str]:
        """What a user's machine sets to use the store and the tracking server."""
        return CREDENTIALS | {"AWS_ENDPOINT_URL": self.s3_url, "MLFLOW_TRACKING_URI": self.tracking_uri}

    def objects(self, prefix: str) -> list[str]:
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_url, **_boto(CREDENTIALS))
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        for process in reversed(self.processes):
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
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
    commands: dict[str, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    node_env: dict[str, str] = field(default_factory=dict)  # the test's own settings for every node

    @property
    def job_server(self) -> str:
        return f"http://{self.net.ip('head')}:8265"

    @property
    def ray_client(self) -> str:
        return f"ray://{self.net.ip('head')}:10001"

    def client_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    @classmethod
    def start(cls, net: Network, services: Services, node_env: dict[str, str] | None = None) -> Cluster:
        stage = Path(f"/run/resnet-pipe-test-{net.tag}")
        stage.mkdir(parents=True)
        cluster = cls(net, secrets.token_hex(16), stage, node_env=node_env or {})
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
            # Ray Train's runs, attempts and workers (with their ranks and nodes) in the dashboard,
            # as a cluster that watches its training has it: where rank 0 runs, how often it restarted
            "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
            "AWS_ENDPOINT_URL": services.s3_url,  # the node's own settings, as a Secret gives a pod
            **CREDENTIALS,
            **cluster.client_env(),
            **cluster.node_env,
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
                cluster.commands[node] = ["ray", "start", *commands[node], *common]
                cluster._start_node(node, cluster.commands[node], env)
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
        venv_copy.mkdir(exist_ok=True)  # there already for a node started again
        self.env = env
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

    def get(self, path: str) -> dict:
        request = urllib.request.Request(
            f"{self.job_server}{path}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def status(self) -> str:
        """`ray status` as the dashboard gives it: the nodes, the resources in use and what waits
        for resources (for the message of a test that timed out)."""
        try:
            data = self.get("/api/cluster_status?format=1")["data"]
        except OSError as e:
            return f"(the dashboard did not answer: {e})"
        return str(data.get("clusterStatus", data))  # the dashboard answers in camelCase

    def train_attempts(self, run_name: str) -> list[dict]:
        """The attempts of Ray Train run `run_name` (the newest run of that name), oldest first,
        each with its status and its workers: world_rank, node_ip."""
        runs = [run for run in self.get("/api/train/v2/runs/v1")["train_runs"] if run["name"] == run_name]
        if not runs:
            return []
        newest = max(runs, key=lambda run: run["start_time_ns"])
        return sorted(newest["attempts"], key=lambda attempt: attempt["start_time_ns"])

    def node_of(self, ip: str) -> str:
        return next(node for node in NODES if self.net.ip(node) == ip)

    def restart_lost_nodes(self) -> Cluster:
        """The worker nodes that were killed, started again (a fresh machine in the node's place,
        with its address), and the cluster whole again."""
        lost = [node for node, process in self.nodes.items() if node != "head" and process.poll() is not None]
        for node in lost:
            self._start_node(node, self.commands[node], self.env)
        self.wait_for_nodes(len(NODES))
        return self

    def kill(self, node: str) -> None:
        """The node's machine gone at once: every process of it SIGKILLed."""
        kill_all(self.net.namespaces[node])
        self.nodes[node].wait(timeout=30)

    @contextlib.contextmanager
    def small_disk(self, node: str, folder: str, size: str) -> Iterator[None]:
        """`folder` on the node's own disk made a tmpfs of `size` (as a small volume mounted there)."""
        enter = ["nsenter", "-t", str(self.nodes[node].pid), "-m"]
        sh(*enter, "mkdir", "-p", folder)
        sh(*enter, "mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder)
        try:
            yield
        finally:
            sh(*enter, "umount", "-l", folder, check=False)

    def read_logs(self, node: str, pattern: str = "*") -> str:
        """The node's Ray session log files that match `pattern` (all of them, and its `ray start`
        output, by default) as one text, each under its name."""
        pid = str(self.nodes[node].pid)
        start_log = "/tmp/ray-start.log" if pattern == "*" else ""
        files = f"{start_log} /tmp/ray/session_*/logs/{pattern}"
        script = f'for f in {files}; do echo "== $f"; cat "$f"; done'
        words = ["sh", "-c", f"{script} 2>/dev/null"]
        listed = subprocess.run(["nsenter", "-t", pid, "-m", *words], capture_output=True, check=False)
        return listed.stdout.decode("utf-8", errors="replace")

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


@contextlib.contextmanager
def share_nothing(
    folder: Path, node_env: dict[str, str] | None = None
) -> Iterator[tuple[Network, Services, dict[str, Cluster]]]:
    """The network, the services and the cluster (in a dict under "cluster": a test that loses the
    whole cluster puts its new one there, `Cluster.start(net, services, cluster.node_env)`), removed
    at the end, leaving no namespace or link. `node_env`: more of every node's environment."""
    net = Network.create()
    try:
        services = Services.start(net, folder / "services")
        try:
            holder = {"cluster": Cluster.start(net, services, node_env)}
            try:
                yield net, services, holder
            finally:
                holder["cluster"].stop()
        finally:
            services.stop()
    finally:
        net.remove()
        assert net.leftovers() == []


T = TypeVar("T")


def wait_until(condition: Callable[[], T], seconds: float, what: str, every_s: float = 0.5) -> T:
    """The first true value of `condition()`, tried every `every_s`; AssertionError naming `what`
    when none came in `seconds`. A condition that raises OSError counts as not yet."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds:.0f} s")
        time.sleep(every_s)


@contextlib.contextmanager
def blocked(port: int, source: str | None = None, action: str = "REJECT") -> Iterator[None]:
    """TCP to `port` on this machine refused (REJECT: a reset, at once) or dropped (DROP: the
    sender waits for its timeout), from `source` (a node's address) or from everyone, this
    machine's own processes too (traffic to its bridge address goes through INPUT on lo)."""
    rule = ["INPUT", "-p", "tcp", "--dport", str(port)] + (["-s", source] if source else [])
    rule += ["-j", action] + (["--reject-with", "tcp-reset"] if action == "REJECT" else [])
    sh("iptables", "-I", *rule)
    try:
        yield
    finally:
        sh("iptables", "-D", *rule)


@contextlib.contextmanager
def slowed(net: Network, node: str, port: int, rate: str = "8mbit") -> Iterator[None]:
    """What `node` sends to `port` (on any host) held to `rate` by tc on its interface (an htb
    class that a u32 filter sends that port's packets to), the rest of its traffic untouched:
    8mbit is 1 MB/s."""
    ns, device = net.namespaces[node], f"rp{net.tag}{NODES.index(node)}n"
    tc = ["ip", "netns", "exec", ns, "tc"]
    sh(*tc, "qdisc", "add", "dev", device, "root", "handle", "1:", "htb", "default", "20")
    try:
        sh(*tc, "class", "add", "dev", device, "parent", "1:", "classid", "1:10", "htb", "rate", rate)
        sh(*tc, "class", "add", "dev", device, "parent", "1:", "classid", "1:20", "htb", "rate", "10gbit")
        sh(*tc, "filter", "add", "dev", device, "protocol", "ip", "parent", "1:0", "prio", "1", "u32",
           "match", "ip", "dport", str(port), "0xffff", "flowid", "1:10")  # fmt: skip
        yield
    finally:
        sh(*tc, "qdisc", "del", "dev", device, "root", check=False)


class User:
    """A user's machine outside the cluster: a folder, their environment (the store's and the
    tracking server's addresses and keys, the cluster's token), and `resnet-pipe` as they type it."""

    def __init__(self, folder: Path, services: Services, cluster: Cluster, extra_env: dict | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.services = folder, services
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
        self.env = env | services.client_env() | cluster.client_env() | (extra_env or {})

    def run(self, *words: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
        """The command's run; its output is also kept beside the user's folder (`commands.log`),
        for a reader of a failed test."""
        done = subprocess.run(
            [str(BIN / "resnet-pipe"), *words], cwd=self.folder, env=self.env, capture_output=True,
            text=True, timeout=timeout_s,
        )  # fmt: skip
        with (self.folder.parent / "commands.log").open("a") as log:
            log.write(
                f"$ resnet-pipe {' '.join(words)}\n{done.stdout}{done.stderr}[exit {done.returncode}]\n"
            )
        return done

    def start(self, *words: str) -> subprocess.Popen:
        """`resnet-pipe WORDS` running in the background, its output (both streams) in a pipe."""
        return subprocess.Popen(
            [str(BIN / "resnet-pipe"), *words], cwd=self.folder, env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip

    def output(self, process: subprocess.Popen, timeout_s: float = 900) -> str:
        """What a command of `start` printed, once it has ended (kept in `commands.log` too)."""
        said = process.communicate(timeout=timeout_s)[0]
        with (self.folder.parent / "commands.log").open("a") as log:
            log.write(f"$ resnet-pipe {' '.join(process.args[1:])}\n{said}[exit {process.returncode}]\n")
        return said

    def upload(self, prepared_dataset: Path, name: str) -> str:
        """The dataset prepared with shards and uploaded to the bucket, its local copy removed;
        returns its URI."""
        dataset = self.folder.parent / f"dataset-{name}"
        shutil.copytree(prepared_dataset, dataset)
        prepared = self.run("data", "prepare", str(dataset), "--shards")
        assert prepared.returncode == 0, prepared.stderr
        uploaded = self.run("data", "upload", str(dataset), f"s3://{BUCKET}/datasets/{name}")
        assert uploaded.returncode == 0, uploaded.stderr
        shutil.rmtree(dataset)
        return f"s3://{BUCKET}/datasets/{name}"
