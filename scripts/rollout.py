#!/usr/bin/env python3
"""`make rollout SERVICE=<name>|all`: restart a running mesh's replicas one at a time.

As a Kubernetes RollingUpdate with maxSurge 0 and maxUnavailable 1: each replica
drains (SIGTERM: it finishes what it has and takes nothing new; a preprocess
replica is first taken out of nginx's rotation), starts again, and the next one
is stopped only once this one is ready and every client that balances over it is
connected to it again. `all` rolls out the backends first, preprocess last.
Standard library only, like scripts/mesh.py, whose plan (run/mesh.json) it reads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from mesh import (
    GRPC_SERVICES,
    ROOT,
    SERVICES,
    Plan,
    Replica,
    hold_port,
    load_dotenv,
    make_plan,
    read_pid,
    release_ports,
    wait_for,
)


def supervisorctl(plan: Plan, *args: str) -> str:
    """Run supervisorctl against this mesh's supervisord; its output."""
    ctl = plan.python.parent / "supervisorctl"
    out = subprocess.run(
        [str(ctl), "-c", str(plan.run_dir / "supervisord.conf"), *args], capture_output=True, text=True, check=False
    )
    return (out.stdout + out.stderr).strip()


def program_pid(plan: Plan, program: str) -> int | None:
    out = supervisorctl(plan, "pid", program)
    return int(out) if out.isdigit() and int(out) > 0 else None


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def health_watchers(replica: Replica) -> int:
    """Client channels balancing over this replica right now (each watches its gRPC health)."""
    try:
        with urllib.request.urlopen(replica.metrics_url, timeout=3) as reply:
            text = reply.read().decode()
    except (urllib.error.URLError, OSError):
        return 0
    found = re.search(r"^ragmesh_grpc_health_watchers (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else 0


def nginx_workers(master: int) -> dict[int, str]:
    """The nginx master's worker processes and their titles (from /proc)."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == master:
                pid = int(stat.parent.name)
                workers[pid] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return workers


def route_preprocess(plan: Plan, out_of_rotation: Replica | None, timeout: float = 30.0) -> None:
    """Take one preprocess replica out of nginx's rotation (or put every one back), and wait
    until nginx runs the new configuration: its old workers accept no new requests (they
    finish the ones they have, open streams included)."""
    conf = plan.run_dir / "nginx" / "nginx.conf"
    ports = {r.http_port for r in plan.replicas["preprocess"]}

    def mark(found: re.Match[str]) -> str:
        port = int(found.group(1))
        if port not in ports:
            return found.group(0)
        down = out_of_rotation is not None and port == out_of_rotation.http_port
        return f"server 127.0.0.1:{port}{' down' if down else ''};"

    text = conf.read_text()
    conf.write_text(re.sub(r"server 127\.0\.0\.1:(\d+)(?: down)?;", mark, text))
    master = program_pid(plan, "nginx")
    if master is None:
        raise RuntimeError("nginx is not running")
    before = set(nginx_workers(master))
    os.kill(master, signal.SIGHUP)

    def reloaded() -> bool:
        workers = nginx_workers(master)
        fresh = set(workers) - before
        old_busy = [pid for pid in before if pid in workers and "shutting down" not in workers[pid]]
        return bool(fresh) and not old_busy

    wait_for(reloaded, timeout, "nginx's reload")


def rollout(plan: Plan, target: str, timeout: float) -> int:
    """Restart a service's replicas (or every service's, backends first) one at a time."""
    if target != "all" and target not in SERVICES:
        print(f"rollout takes a service ({', '.join(SERVICES)}) or all, not {target!r}", file=sys.stderr)
        return 2
    if read_pid(plan.run_dir / "supervisord.pid") is None:
        print(f"no mesh is running from {plan.run_dir}", file=sys.stderr)
        return 1
    clients = len(plan.replicas["preprocess"])  # each preprocess replica balances over every backend
    for service in SERVICES if target == "all" else (target,):
        replicas = plan.replicas[service]
        if len(replicas) == 1:
            print(f"{service} has one replica: it is unavailable while it restarts (RAGMESH_REPLICAS)", flush=True)
        for replica in replicas:
            started = time.monotonic()
            behind_gateway = service == "preprocess" and len(replicas) > 1
            if behind_gateway:
                route_preprocess(plan, replica)
            print(f"{replica.program}: draining", flush=True)
            print(supervisorctl(plan, "stop", replica.program), flush=True)
            # Its ports are held until it listens again: nothing else takes them meanwhile.
            for port in (replica.http_port, replica.grpc_port, replica.admin_port):
                if port is not None and not hold_port(port):
                    print(f"{replica.program}: port {port} was taken while it stopped", file=sys.stderr)
            try:
                print(supervisorctl(plan, "start", replica.program), flush=True)
                wait_for(lambda r=replica: http_ok(r.ready_url), timeout, f"{replica.program}")
            finally:
                release_ports()
            if service in GRPC_SERVICES:
                wait_for(
                    lambda r=replica: health_watchers(r) >= clients,
                    timeout,
                    f"the clients of {replica.program}",
                )
            if behind_gateway:
                route_preprocess(plan, None)
            print(f"{replica.program}: ready again after {time.monotonic() - started:.1f} s", flush=True)
    print(f"rollout of {target} done", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("service", help=f"{', '.join(SERVICES)} or all")
    parser.add_argument("--run-dir", default=None, help="the mesh's run folder (default: run/)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a replica may take to be ready")
    args = parser.parse_args()
    env = dict(os.environ)
    load_dotenv(ROOT / ".env", env)
    run_dir = Path(args.run_dir or env.get("RAGMESH_RUN_DIR") or ROOT / "run").resolve()
    plan = make_plan(env, run_dir, running=read_pid(run_dir / "supervisord.pid") is not None)
    return rollout(plan, args.service, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
