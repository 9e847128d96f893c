"""Helpers for the service tests (no tests here): tiny trained checkpoints and a real uvicorn process."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import torch

from metalearn import MLP, Conv4, MetaConfig, MetaLearner
from metalearn.checkpoint import save_checkpoint
from metalearn.data.preprocess import OMNIGLOT_PREPROCESSING
from metalearn.data.tasks import TaskBatch

ROOT = Path(__file__).resolve().parents[1]


def image_tasks(tasks=2, ways=5, shots=1, queries=2, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = lambda k: torch.arange(ways).repeat_interleave(k).expand(tasks, -1).clone()  # noqa: E731
    sx = torch.rand(tasks, ways * shots, 1, 28, 28, generator=g)
    qx = torch.rand(tasks, ways * queries, 1, 28, 28, generator=g)
    return TaskBatch(sx, labels(shots), qx, labels(queries))


def sine_tasks(tasks=4, shots=5, queries=5, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    amplitude = torch.rand(tasks, 1, 1, generator=g) * 4 + 0.5
    phase = torch.rand(tasks, 1, 1, generator=g) * 3

    def points(n):
        x = torch.rand(tasks, n, 1, generator=g) * 10 - 5
        return x, amplitude * torch.sin(x - phase)

    sx, sy = points(shots)
    qx, qy = points(queries)
    return TaskBatch(sx, sy, qx, qy)


def train_and_save(path: Path, learner: MetaLearner, batches, **manifest) -> Path:
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    for i, batch in enumerate(batches):
        learner.meta_step(batch, optimizer, iteration=i)
    save_checkpoint(path, learner, metrics={"val_loss": 1.0}, training={"meta_steps": len(batches)}, **manifest)
    return path


def make_model_dir(root: Path, conv_channels: int = 8) -> Path:
    """conv_maml.safetensors (5-way images, MAML), anil_run/best.safetensors (ANIL), sine.safetensors, broken.safetensors."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    conv = MetaLearner(Conv4(out_features=5, channels=conv_channels), MetaConfig("maml", inner_steps=2, inner_lr=0.4, first_order=True))
    train_and_save(root / "conv_maml.safetensors", conv, [image_tasks(seed=s) for s in range(2)],
                   input_shape=(1, 28, 28), n_way=5, preprocessing=OMNIGLOT_PREPROCESSING)
    anil = MetaLearner(Conv4(out_features=5, channels=conv_channels), MetaConfig("anil", inner_steps=3, inner_lr=0.4))
    train_and_save(root / "anil_run" / "best.safetensors", anil, [image_tasks(seed=s) for s in range(2)],
                   input_shape=(1, 28, 28), n_way=5, preprocessing=OMNIGLOT_PREPROCESSING)
    sine = MetaLearner(MLP(1, (40, 40), 1), MetaConfig("maml", task_type="regression", inner_steps=3, inner_lr=0.01))
    train_and_save(root / "sine.safetensors", sine, [sine_tasks(seed=s) for s in range(3)], input_shape=(1,))
    (root / "broken.safetensors").write_bytes(b"this is not a checkpoint")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``uvicorn service.app:app`` (or another ``app``) in a subprocess on a free loopback port, configured by
    METALEARN_* env; with ``cli``, ``metalearn serve`` (what the Dockerfile and compose file run) instead."""

    def __init__(self, model_dir: Path, log_path: Path, cli: bool = False, app: str = "service.app:app", **settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env = {k: v for k, v in env.items() if not k.startswith("METALEARN_")}
        env["METALEARN_MODEL_DIR"] = str(model_dir)
        env.setdefault("METALEARN_THREADS", "1")
        for key, value in settings.items():
            env["METALEARN_" + key.upper()] = str(value)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.log_path = log_path
        self._log = open(log_path, "wb")
        if cli:
            command = ["-m", "metalearn.cli", "serve", "--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port)]
        else:
            command = ["-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        self.process = subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        stop_process(self.process)
        self._log.close()


def stop_process(process: subprocess.Popen, stop_signal: int = signal.SIGTERM, wait_s: float = 15.0) -> None:
    """Send ``stop_signal`` (a graceful stop) and wait; killed if it is still running after ``wait_s``."""
    if process.poll() is None:
        process.send_signal(stop_signal)
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` grey pixels, with next to no pixel data: what a
    decompression bomb looks like until it is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
