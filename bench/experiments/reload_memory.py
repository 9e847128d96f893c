"""Reloads of a changing model directory: do replaced model versions leave memory?

    python bench/experiments/reload_memory.py                 # 40 reloads
    python bench/experiments/reload_memory.py --reloads 100 --channels 64

Builds the test suite's model directory (a MAML and an ANIL Conv4, ``--channels`` wide, and a sine
regressor), runs the service in process (``TestClient``, two workers) and, ``--reloads`` times: sends
adaptations that keep a session (then predicted and deleted) and stateless ANIL adapt-and-predicts, so
that the engine records traces and compiles, then writes both image checkpoints again as new versions
(``service_bench.publish_new_version``) and reloads (``service.app.reload_models``, what SIGHUP runs).
Every ``--every`` reloads it prints how many of the model versions replaced so far are still alive (weak
references, after a full garbage collection), the engine's traces and compilations, and the process's
resident memory.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from fastapi.testclient import TestClient  # noqa: E402

from metalearn.client import encode_tensor  # noqa: E402
from service.app import create_app, reload_models  # noqa: E402
from service.settings import Settings  # noqa: E402
from service_bench import publish_new_version  # noqa: E402
from test_service_helpers import image_tasks, make_model_dir  # noqa: E402

CHANGING = ("conv_maml", "anil_run")


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reloads", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--channels", type=int, default=32)
    args = parser.parse_args()

    model_dir = make_model_dir(Path(tempfile.mkdtemp()) / "models", conv_channels=args.channels)
    app = create_app(Settings(model_dir=str(model_dir), threads=1, workers=2))
    task = image_tasks(tasks=1, queries=1, seed=1)
    support = {"x": encode_tensor(task.support_x[0]), "y": task.support_y[0].tolist()}
    query = {"x": encode_tensor(task.query_x[0])}
    versions: list[weakref.ref] = []
    with TestClient(app) as client:
        for reload in range(1, args.reloads + 1):
            versions += [weakref.ref(app.state.registry.get(name)) for name in CHANGING]
            for _ in range(6):
                session = client.post("/v1/models/conv_maml/adapt", json={"support": support}).json()["session_id"]
                assert client.post(f"/v1/sessions/{session}/predict", json=query).status_code == 200
                assert client.delete(f"/v1/sessions/{session}").status_code == 204
                assert client.post("/v1/models/anil_run/predict", json={"support": support, "query": query}).status_code == 200
            publish_new_version(model_dir / "conv_maml.safetensors", reload)
            publish_new_version(model_dir / "anil_run" / "best.safetensors", reload)
            changes = client.portal.call(reload_models, app)
            assert changes["updated"] == sorted(CHANGING), changes
            if reload % args.every == 0:
                gc.collect()
                alive = sum(ref() is not None for ref in versions)
                traces, scripts = app.state.engine.trace_stats(), app.state.engine.script_stats()
                print(f"reload {reload:4d}: replaced model versions still alive {alive} of {len(versions)}; "
                      f"traces held {traces['held']} (recorded {traces['captures']}), compilations held {scripts['held']} "
                      f"(compiled {scripts['captures']}); resident {resident_mb():.0f} MB", flush=True)


if __name__ == "__main__":
    main()
