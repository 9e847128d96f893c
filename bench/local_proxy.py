"""``deploy/nginx.conf`` run outside Docker: nginx on a free 127.0.0.1 port in front of services on loopback
ports (``apt-get install nginx-light``). The tests (``tests/test_replicas.py``) and the benchmarks use it.

Compose's network gives two lines of the file that loopback cannot: the upstream (``server api:8000
resolve;``, every replica of the api service) and the port (``listen 8080;``). They are replaced, and nginx
keeps its pid file and temporary files in a directory of its own.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from service_bench import free_port

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"
UPSTREAM, LISTEN = "server api:8000 resolve;", "listen 8080;"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def render_config(upstream_ports: list[int], port: int, workdir: Path, replace: dict[str, str] | None = None) -> Path:
    """``workdir/nginx.conf``: the deployment's config with the upstream and the port on loopback, and
    ``replace``'s other text replaced (a benchmark lifting the rate limits, say)."""
    text = CONFIG.read_text()
    for line in (UPSTREAM, LISTEN, *(replace or {})):
        if text.count(line) != 1:
            raise ValueError(f"{CONFIG} no longer holds {line!r} once")
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    temp = " ".join(f"{kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = (text.replace(UPSTREAM, " ".join(f"server 127.0.0.1:{p};" for p in upstream_ports))
                .replace(LISTEN, f"listen 127.0.0.1:{port};")
                .replace("http {", "http {\n    " + temp, 1))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "nginx.conf"
    path.write_text(text)
    return path


def without_privileges(capabilities: list[str], user: str | None = None) -> list[str]:
    """``setpriv`` arguments that run a command as a container with ``cap_drop: ALL``, ``cap_add: capabilities``
    and no-new-privileges runs it (as root, or as ``user``: its uid and group, no other groups)."""
    allowed = ",".join(["-all", *("+" + name.lower() for name in capabilities)])
    switch = []
    if user is not None:
        account = pwd.getpwnam(user)
        switch = [f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups"]
    return ["setpriv", *switch, f"--bounding-set={allowed}", "--inh-caps=-all", "--no-new-privs"]


def start_proxy(upstream_ports: list[int], workdir: Path, replace: dict[str, str] | None = None, timeout_s: float = 20.0,
                capabilities: list[str] | None = None) -> tuple[subprocess.Popen, int]:
    """nginx in front of ``upstream_ports``, its output in ``workdir/nginx.log``: the process and its port, once
    it accepts connections. Stop it with SIGQUIT (nginx's graceful stop).

    ``capabilities`` (as root): run it as the compose file's container does, with only these capabilities
    (``cap_add`` after ``cap_drop: ALL``) and no-new-privileges, its workers as ``nobody``; ``workdir``
    must then be open to them, as the container's tmpfs is (mode 1777)."""
    nginx = nginx_binary()
    if nginx is None:
        raise FileNotFoundError("nginx is not installed (apt-get install nginx-light)")
    port = free_port()
    config = render_config(upstream_ports, port, workdir, replace)
    prefix, user = [], "user root;" if os.geteuid() == 0 else ""  # (as root its workers would run as nobody, who may not reach workdir)
    if capabilities is not None:
        if os.geteuid() != 0:
            raise PermissionError("running nginx with chosen capabilities needs root")
        prefix = without_privileges(capabilities)
        nobody = pwd.getpwnam("nobody")
        user = f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
    log = open(workdir / "nginx.log", "wb")
    process = subprocess.Popen([*prefix, nginx, "-e", "stderr", "-p", str(workdir), "-c", str(config),
                                "-g", f"daemon off; pid {workdir / 'nginx.pid'}; {user}"], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited: {(workdir / 'nginx.log').read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"nginx did not listen within {timeout_s} s") from None
            time.sleep(0.05)
