#!/usr/bin/env python3
"""Run the whole mesh on one machine: `make up` / `make down` / `make logs` call this.

supervisord (a maintained process manager) runs the four services and nginx,
restarting any that crashes; this script only renders the configs, makes sure
Redis and RabbitMQ answer, starts supervisord and waits until the gateway says
ready. Standard library only, so `make down` works even without the venv.

Ports and addresses come from the same RAGMESH_* variables the services read
(see .env.example); a `.env` file at the repository root is loaded first.

Replicas: RAGMESH_REPLICAS="inference=2,retrieval=2,postprocess=2,preprocess=2"
runs that many processes of each service (one if unnamed). The first replica
listens on the configured ports, the others on free ports picked at `up` and kept
in run/mesh.json. Every service gets the address list of its peers' replicas and
nginx balances over the preprocess replicas. scripts/rollout.py (`make rollout`)
restarts a service's replicas one at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

# Its sibling module, however this file is loaded (as a script, by rollout.py, by tests).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mesh_env import agreed, without_secrets

ROOT = Path(__file__).resolve().parent.parent
# Backends first, the front after them: the order of `up` and of `rollout all`.
SERVICES = ("inference", "retrieval", "postprocess", "preprocess")
GRPC_SERVICES = ("inference", "retrieval", "postprocess")


@dataclass(frozen=True)
class Replica:
    """One process of a service: its supervisord program and its ports."""

    service: str
    index: int
    count: int
    http_port: int
    grpc_port: int | None
    # preprocess's admin listener (the internal admin API); None for the other services.
    admin_port: int | None = None

    @property
    def program(self) -> str:
        """The supervisord program: the service's name, or name-<index> when there are several."""
        return self.service if self.count == 1 else f"{self.service}-{self.index}"

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v1/health/ready"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metrics"


@dataclass(frozen=True)
class Plan:
    """Where everything listens and lives, resolved from the environment."""

    run_dir: Path
    python: Path
    gateway_host: str
    gateway_port: int
    ports: dict[str, int]
    replicas: dict[str, list[Replica]]

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"

    def grpc_addresses(self, service: str) -> str:
        """Every replica's gRPC address, as the peers' settings take it (a comma list)."""
        return ",".join(f"127.0.0.1:{r.grpc_port}" for r in self.replicas[service])


def load_dotenv(path: Path, env: dict[str, str]) -> None:
    """KEY=VALUE lines (comments and blank lines skipped); the real environment wins."""
    if not path.is_file():
        return
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        env.setdefault(key.strip(), value.strip().strip("'\""))


def replica_counts(env: dict[str, str]) -> dict[str, int]:
    """RAGMESH_REPLICAS="inference=2,retrieval=2": processes per service (1 when unnamed)."""
    counts = dict.fromkeys(SERVICES, 1)
    for item in env.get("RAGMESH_REPLICAS", "").replace(" ", "").split(","):
        if not item:
            continue
        name, _, value = item.partition("=")
        if name not in counts or not value.isdigit() or int(value) < 1:
            sys.exit(f"RAGMESH_REPLICAS: {item!r} is not <service>=<count> with a service of {', '.join(SERVICES)}")
        counts[name] = int(value)
    return counts


# Ports picked for extra replicas, held from the plan until the replicas listen on them.
_held_ports: dict[int, socket.socket] = {}


def free_port() -> int:
    """A free loopback port for a replica, held until `release_ports` (after the replicas are up).

    Picking a port and letting it go left a window, until the replica bound it, in which
    anything else could take it (a bind(0), an outgoing connection's local port): the replica
    then failed to listen. The port stays bound here instead, with SO_REUSEADDR and never
    listening: the kernel gives it to no bind(0), no outgoing connection and no plain bind,
    while the replica (uvicorn and gRPC bind with SO_REUSEADDR too) binds and listens on it.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    _held_ports[port] = sock
    return port


def hold_port(port: int) -> bool:
    """Hold a replica's own port (as `free_port` does) while it restarts; False if something
    else took it meanwhile."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return False
    _held_ports[port] = sock
    return True


def release_ports() -> None:
    """Let go of the ports `free_port` holds (their replicas listen on them by now, or never will)."""
    while _held_ports:
        _, sock = _held_ports.popitem()
        sock.close()


def plan_replicas(ports: dict[str, int], counts: dict[str, int]) -> dict[str, list[Replica]]:
    """Replica 0 on the configured ports, the others on free ones."""
    replicas: dict[str, list[Replica]] = {}
    for service in SERVICES:
        count = counts[service]
        listed = []
        for index in range(count):
            if index == 0:
                http, grpc_port = ports[f"{service}_http"], ports.get(f"{service}_grpc")
                admin = ports["preprocess_admin"] if service == "preprocess" else None
            else:
                http, grpc_port = free_port(), free_port() if service in GRPC_SERVICES else None
                admin = free_port() if service == "preprocess" else None
            listed.append(Replica(service, index, count, http, grpc_port, admin))
        replicas[service] = listed
    return replicas


def saved_replicas(run_dir: Path) -> dict[str, list[Replica]] | None:
    """The replicas of the mesh `up` started in this run folder (run/mesh.json), if any."""
    try:
        saved = json.loads((run_dir / "mesh.json").read_text())["replicas"]
        return {
            service: [
                Replica(service, index, len(saved[service]), int(r["http"]), r["grpc"], r.get("admin"))
                for index, r in enumerate(saved[service])
            ]
            for service in SERVICES
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make_plan(env: dict[str, str], run_dir: Path, running: bool = False) -> Plan:
    """The plan from the environment; for a running mesh, its replicas as `up` saved them."""

    def port(name: str, default: int) -> int:
        return int(env.get(name, default))

    ports = {
        "preprocess_http": port("RAGMESH_PREPROCESS_HTTP_PORT", 8000),
        "preprocess_admin": port("RAGMESH_PREPROCESS_ADMIN_PORT", 8004),
        "gateway_admin": port("RAGMESH_GATEWAY_ADMIN_PORT", 8081),
        "inference_http": port("RAGMESH_INFERENCE_HTTP_PORT", 8001),
        "retrieval_http": port("RAGMESH_RETRIEVAL_HTTP_PORT", 8002),
        "postprocess_http": port("RAGMESH_POSTPROCESS_HTTP_PORT", 8003),
        "inference_grpc": port("RAGMESH_INFERENCE_GRPC_PORT", 50051),
        "retrieval_grpc": port("RAGMESH_RETRIEVAL_GRPC_PORT", 50052),
        "postprocess_grpc": port("RAGMESH_POSTPROCESS_GRPC_PORT", 50053),
    }
    python = Path(env.get("RAGMESH_PYTHON", str(ROOT / ".venv" / "bin" / "python")))
    replicas = saved_replicas(run_dir) if running else None
    return Plan(
        run_dir=run_dir,
        python=python,
        gateway_host=env.get("RAGMESH_GATEWAY_HOST", "127.0.0.1"),
        gateway_port=port("RAGMESH_GATEWAY_PORT", 8080),
        ports=ports,
        replicas=replicas or plan_replicas(ports, replica_counts(env)),
    )


def save_plan(plan: Plan) -> None:
    """Where every replica listens (read back by rollout, and by whoever needs a replica's port)."""
    replicas = {
        service: [
            {"program": r.program, "http": r.http_port, "grpc": r.grpc_port, "admin": r.admin_port} for r in listed
        ]
        for service, listed in plan.replicas.items()
    }
    body = {"gateway": plan.gateway_url, "replicas": replicas}
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "mesh.json").write_text(json.dumps(body, indent=2) + "\n")


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def service_token(run_dir: Path) -> str:
    """The run folder's service credential, made on first use (readable by its owner only)."""
    path = run_dir / "service-token"
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def service_env(plan: Plan, env: dict[str, str]) -> dict[str, str]:
    """The environment every service gets: the caller's, plus consistent peer addresses."""
    out = dict(env)
    p = plan.ports
    for name in SERVICES:
        out.setdefault(f"RAGMESH_{name.upper()}_HTTP_PORT", str(p[f"{name}_http"]))
        if f"{name}_grpc" in p:
            out.setdefault(f"RAGMESH_{name.upper()}_GRPC_PORT", str(p[f"{name}_grpc"]))
    # Peers: every replica's address; the clients balance over them.
    out.setdefault("RAGMESH_PREPROCESS_INFERENCE_ADDR", plan.grpc_addresses("inference"))
    out.setdefault("RAGMESH_PREPROCESS_RETRIEVAL_ADDR", plan.grpc_addresses("retrieval"))
    out.setdefault("RAGMESH_PREPROCESS_POSTPROCESS_ADDR", plan.grpc_addresses("postprocess"))
    out.setdefault("RAGMESH_RETRIEVAL_PEERS", plan.grpc_addresses("retrieval"))
    out.setdefault("RAGMESH_PREPROCESS_ADMIN_PORT", str(p["preprocess_admin"]))
    out.setdefault("RAGMESH_DATA_DIR", str(plan.run_dir / "data"))
    # The gRPC plane's service credential: the operator's, or one made for this run folder
    # (kept, so a rollout's restarted replicas get the same one).
    out.setdefault("RAGMESH_SERVICE_TOKEN", service_token(plan.run_dir))
    # Engines share the machine's cores: with several inference replicas, each gets its share.
    engines = len(plan.replicas["inference"])
    if engines > 1:
        threads = str(max(1, (os.cpu_count() or 2) // engines))
        out.setdefault("RAGMESH_INFERENCE_N_THREADS", threads)
        out.setdefault("RAGMESH_INFERENCE_N_THREADS_BATCH", threads)
    # Dev mode: a gateway only this machine can reach needs no API keys. Anything
    # else (RAGMESH_GATEWAY_HOST=0.0.0.0, a LAN address) keeps auth on.
    if plan.gateway_host in LOOPBACK:
        out.setdefault("RAGMESH_PREPROCESS_AUTH", "off")
    # Values that must agree across the gateway and preprocess, derived from one source.
    out.update(agreed(env)[0])
    out.setdefault("OMP_NUM_THREADS", "1")
    out.setdefault("HF_HUB_OFFLINE", "1")
    out.setdefault("PYTHONUNBUFFERED", "1")
    return out


# --- rendering -----------------------------------------------------------------


def nginx_servers(plan: Plan, down: str | None = None, admin: bool = False) -> str:
    """The preprocess upstream's server lines (of the admin listeners when `admin`); `down`
    (a program) is taken out of rotation."""
    return "\n        ".join(
        f"server 127.0.0.1:{r.admin_port if admin else r.http_port}{' down' if r.program == down else ''};"
        for r in plan.replicas["preprocess"]
    )


def render_nginx(plan: Plan, env: dict[str, str], down: str | None = None) -> Path:
    nginx_dir = plan.run_dir / "nginx"
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (nginx_dir / sub).mkdir(parents=True, exist_ok=True)
    values = {
        "NGINX_USER": f"{pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name}",
        "NGINX_WORKERS": env.get("RAGMESH_NGINX_WORKERS", "1"),
        "NGINX_RUN_DIR": str(nginx_dir),
        "NGINX_LOG_DIR": str(plan.log_dir),
        # preprocess's own limit (or the gateway's, when only that one is set): one value.
        "NGINX_MAX_BODY": agreed(env)[0]["RAGMESH_GATEWAY_MAX_BODY"],
        "NGINX_TIMEOUT": env.get("RAGMESH_GATEWAY_TIMEOUT", "600s"),
        "NGINX_API_TIMEOUT": env.get("RAGMESH_GATEWAY_API_TIMEOUT", "120s"),
        "NGINX_CLIENT_TIMEOUT": env.get("RAGMESH_GATEWAY_CLIENT_TIMEOUT", "30s"),
        "NGINX_RATE": env.get("RAGMESH_GATEWAY_RATE", "200r/s"),
        "NGINX_BURST": env.get("RAGMESH_GATEWAY_BURST", "400"),
        "NGINX_PREPROCESS_SERVERS": nginx_servers(plan, down),
        "NGINX_LISTEN": f"{plan.gateway_host}:{plan.gateway_port}",
        # The admin server: loopback unless told otherwise, whatever the public listener is.
        "NGINX_ADMIN_LISTEN": f"{env.get('RAGMESH_GATEWAY_ADMIN_HOST', '127.0.0.1')}:{plan.ports['gateway_admin']}",
        "NGINX_PREPROCESS_ADMIN_SERVERS": nginx_servers(plan, down, admin=True),
        # The web console's static files, served as they are in the checkout (no build step).
        "NGINX_CONSOLE_DIR": str(ROOT / "console"),
    }
    template = string.Template((ROOT / "nginx" / "nginx.conf.template").read_text())
    conf = nginx_dir / "nginx.conf"
    conf.write_text(template.safe_substitute(values))
    return conf


def replica_env(replica: Replica, data_root: str) -> dict[str, str]:
    """What one replica sets on top of the mesh's environment: its ports (and, for retrieval,
    its own data folder and events queue)."""
    if replica.count == 1:
        return {}
    prefix = f"RAGMESH_{replica.service.upper()}"
    env = {f"{prefix}_HTTP_PORT": str(replica.http_port)}
    if replica.grpc_port is not None:
        env[f"{prefix}_GRPC_PORT"] = str(replica.grpc_port)
    if replica.admin_port is not None:
        env[f"{prefix}_ADMIN_PORT"] = str(replica.admin_port)
    if replica.service == "retrieval" and replica.index > 0:
        # The first replica keeps the single-replica layout (and its data) as it was.
        env["RAGMESH_RETRIEVAL_REPLICA_ID"] = f"{socket.gethostname()}-{replica.index}"
        env["RAGMESH_RETRIEVAL_DATA_DIR"] = str(Path(data_root) / f"retrieval-{replica.index}")
    return env


def stop_wait_seconds(env: dict[str, str], service: str) -> int:
    """How long supervisord waits for a replica's drain before SIGKILL: its grace, and some."""
    prefix = f"RAGMESH_{service.upper()}"
    grace = float(env.get(f"{prefix}_SHUTDOWN_GRACE", 25)) + float(env.get(f"{prefix}_DRAIN_DELAY", 1))
    return int(grace) + 10


def render_supervisord(plan: Plan, nginx_conf: Path, env: dict[str, str]) -> Path:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    lines = [
        "[supervisord]",
        f"logfile={plan.log_dir}/supervisord.log",
        f"pidfile={plan.run_dir}/supervisord.pid",
        f"childlogdir={plan.log_dir}",
        f"directory={ROOT}",
        "",
        "[unix_http_server]",
        f"file={plan.run_dir}/supervisor.sock",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{plan.run_dir}/supervisor.sock",
        "",
    ]
    # Backends first, the front (preprocess) after them, the gateway last.
    priority = {"inference": 10, "retrieval": 10, "postprocess": 10, "preprocess": 20, "nginx": 30}
    programs: list[tuple[str, str, int, dict[str, str], int]] = [
        (
            r.program,
            # Started without the secrets this service does not read (scripts/mesh_env.py).
            without_secrets(r.service, f"{plan.python} -m {r.service}"),
            priority[r.service],
            replica_env(r, env.get("RAGMESH_DATA_DIR") or str(plan.run_dir / "data")),
            stop_wait_seconds(env, r.service),
        )
        for service in SERVICES
        for r in plan.replicas[service]
    ]
    nginx_command = f"{nginx} -p {nginx_conf.parent} -c {nginx_conf} -e {plan.log_dir}/nginx-error.log -g 'daemon off;'"
    programs.append(("nginx", without_secrets("nginx", nginx_command), priority["nginx"], {}, 20))
    for name, command, order, extra_env, stop_wait in programs:
        lines += [
            f"[program:{name}]",
            f"command={command}",
            f"priority={order}",
            "autostart=true",
            "autorestart=true",
            "startsecs=1",
            "startretries=100",
            "stopsignal=TERM",
            f"stopwaitsecs={stop_wait}",
            "stopasgroup=true",
            "killasgroup=true",
            "redirect_stderr=true",
            f"stdout_logfile={plan.log_dir}/{name}.log",
            "stdout_logfile_maxbytes=20MB",
            "stdout_logfile_backups=2",
        ]
        if extra_env:
            lines.append("environment=" + ",".join(f'{k}="{v}"' for k, v in extra_env.items()))
        lines.append("")
    conf = plan.run_dir / "supervisord.conf"
    conf.write_text("\n".join(lines))
    return conf


# --- dependencies ----------------------------------------------------------------


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def apt_install(package: str) -> None:
    print(f"installing {package} with apt-get", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q", package], check=True, env=env)


def redis_refusal(url: str) -> str | None:
    """Why Redis refuses the credentials in `url` (None: it answers PING with them)."""
    import redis  # the venv's client (make up runs this script with the venv's python)

    try:
        redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5).ping()
    except (redis.AuthenticationError, redis.ResponseError) as exc:
        return str(exc)
    return None


def ensure_redis(env: dict[str, str], plan: Plan) -> None:
    """Redis at RAGMESH_REDIS_URL answering with that URL's credentials; on this machine, one is
    started when none listens, with the URL's password (--requirepass) when it has one."""
    raw = env.get("RAGMESH_REDIS_URL") or env.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    url = urlparse(raw)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    if reachable(host, port):
        refused = redis_refusal(raw)
        if refused:
            sys.exit(f"Redis at {host}:{port} refuses the credentials of RAGMESH_REDIS_URL: {refused}")
        return
    if host not in ("127.0.0.1", "localhost"):
        sys.exit(f"Redis at {host}:{port} does not answer")
    if not shutil.which("redis-server"):
        apt_install("redis-server")
    print(f"starting redis-server on 127.0.0.1:{port}", flush=True)
    pidfile = plan.run_dir / "redis.pid"
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--pidfile",
            str(pidfile),
            "--logfile",
            str(plan.log_dir / "redis.log"),
            "--dir",
            str(plan.run_dir),
            # The URL's password, so that nothing else on this machine reads or writes the keys.
            *(["--requirepass", unquote(url.password)] if url.password else []),
        ],
        check=True,
    )
    wait_for(lambda: reachable(host, port), 30, "Redis")


def ensure_rabbitmq(env: dict[str, str], plan: Plan) -> None:
    url = urlparse(env.get("RAGMESH_AMQP_URL") or env.get("AMQP_URL") or "amqp://guest:guest@127.0.0.1:5672/")
    host, port = url.hostname or "127.0.0.1", url.port or 5672
    if reachable(host, port):
        return
    if host not in ("127.0.0.1", "localhost"):
        sys.exit(f"RabbitMQ at {host}:{port} does not answer")
    if not shutil.which("rabbitmq-server"):
        apt_install("rabbitmq-server")
    print("starting rabbitmq-server (about 10 s)", flush=True)
    subprocess.run(
        ["rabbitmq-server", "-detached"], check=True, env=dict(os.environ, RABBITMQ_NODE_IP_ADDRESS="127.0.0.1")
    )
    subprocess.run(["rabbitmqctl", "await_startup", "--timeout", "60"], check=True)
    (plan.run_dir / "rabbitmq.started").write_text("started by make up\n")
    user, password = unquote(url.username or "guest"), unquote(url.password or "guest")
    if user != "guest":
        # The URL's user, made on the broker this run started (guest stays loopback-only).
        subprocess.run(["rabbitmqctl", "add_user", user, password], check=False, capture_output=True)
        subprocess.run(["rabbitmqctl", "set_permissions", "-p", "/", user, ".*", ".*", ".*"], check=True)


def stop_started_dependencies(plan: Plan) -> None:
    redis_pid = plan.run_dir / "redis.pid"
    if redis_pid.is_file():
        stop_pid(int(redis_pid.read_text().strip()), "redis-server")
        redis_pid.unlink(missing_ok=True)
    marker = plan.run_dir / "rabbitmq.started"
    if marker.is_file():
        subprocess.run(["rabbitmqctl", "stop"], check=False)
        marker.unlink()


# --- processes -------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def stop_pid(pid: int, name: str, timeout: float = 40.0) -> None:
    """SIGTERM, wait, then SIGKILL: supervisord stops its children on SIGTERM."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            print(f"stopped {name} (pid {pid})", flush=True)
            return
        time.sleep(0.2)
    print(f"{name} (pid {pid}) did not stop in {timeout:.0f} s: killing it", flush=True)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def wait_for(check: object, timeout: float, what: str) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def gateway_ready(plan: Plan) -> bool:
    try:
        with urllib.request.urlopen(f"{plan.gateway_url}/v1/health/ready", timeout=3) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def replica_ready(replica: Replica) -> bool:
    """Whether one replica answers its readiness probe with 200."""
    try:
        with urllib.request.urlopen(replica.ready_url, timeout=3) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def not_ready(plan: Plan) -> list[str]:
    """What is not ready yet: the gateway, and every replica by its program name.

    The gateway's own probe vouches for one preprocess replica only (whichever nginx
    picked); the mesh is ready when every process of every service is.
    """
    waiting = [] if gateway_ready(plan) else ["the gateway"]
    return waiting + [r.program for service in SERVICES for r in plan.replicas[service] if not replica_ready(r)]


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# --- commands ----------------------------------------------------------------------


def up(plan: Plan, env: dict[str, str], timeout: float) -> int:
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    pidfile = plan.run_dir / "supervisord.pid"
    problems = agreed(env)[1]
    if problems:
        print("settings that must agree do not:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    if read_pid(pidfile) is None:
        if reachable(plan.gateway_host, plan.gateway_port, 0.5):
            print(f"port {plan.gateway_port} is taken by another program; set RAGMESH_GATEWAY_PORT", file=sys.stderr)
            return 1
        ensure_redis(env, plan)
        ensure_rabbitmq(env, plan)
        supervisord_conf = render_supervisord(plan, render_nginx(plan, env), env)
        save_plan(plan)
        supervisord = plan.python.parent / "supervisord"
        subprocess.run([str(supervisord), "-c", str(supervisord_conf)], check=True, env=service_env(plan, env))
        print(f"started the mesh (logs in {plan.log_dir}); waiting for {plan.gateway_url}/v1/health/ready", flush=True)
        for service in SERVICES:
            listed = plan.replicas[service]
            if len(listed) > 1:
                where = ", ".join(
                    f"{r.program} http:{r.http_port}" + (f" grpc:{r.grpc_port}" if r.grpc_port else "") for r in listed
                )
                print(f"  {service}: {where}", flush=True)
    else:
        print("the mesh is already running; waiting until it is ready", flush=True)
    started = time.monotonic()
    try:
        wait_for(lambda: not not_ready(plan), timeout, "the mesh")
    except TimeoutError as exc:
        release_ports()
        print(f"{exc} ({', '.join(not_ready(plan))}). Last log lines:", file=sys.stderr)
        programs = [r.program for service in SERVICES for r in plan.replicas[service]]
        for name in (*programs, "nginx"):
            print(f"--- {name}\n{tail(plan.log_dir / f'{name}.log')}", file=sys.stderr)
        print("the mesh is left running for inspection: `make down` stops it", file=sys.stderr)
        return 1
    release_ports()  # every replica listens on its port now
    print(f"ready in {time.monotonic() - started:.1f} s: {plan.gateway_url}/v1", flush=True)
    return 0


def down(plan: Plan) -> int:
    pid = read_pid(plan.run_dir / "supervisord.pid")
    if pid is None:
        print("the mesh is not running", flush=True)
    else:
        # Each service drains first (up to its SHUTDOWN_GRACE), the front after the backends.
        stop_pid(pid, "supervisord and the mesh", timeout=150.0)
    stop_started_dependencies(plan)
    return 0


def logs(plan: Plan) -> int:
    files = sorted(str(p) for p in plan.log_dir.glob("*.log"))
    if not files:
        print(f"no logs in {plan.log_dir}")
        return 1
    os.execvp("tail", ["tail", "-n", "20", "-F", *files])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "logs", "render"])
    parser.add_argument("--run-dir", default=None, help="configs, pids, logs and data (default: run/)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds `up` waits for readiness")
    args = parser.parse_args()

    env = dict(os.environ)
    load_dotenv(ROOT / ".env", env)
    run_dir = Path(args.run_dir or env.get("RAGMESH_RUN_DIR") or ROOT / "run").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = make_plan(env, run_dir, running=read_pid(run_dir / "supervisord.pid") is not None)
    if args.command == "up":
        return up(plan, env, args.timeout)
    if args.command == "down":
        return down(plan)
    if args.command == "logs":
        return logs(plan)
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    print(render_supervisord(plan, render_nginx(plan, env), env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
