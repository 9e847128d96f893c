"""A Redis session store's get of a Conv4 MAML session, held decoded by the replica or not.

    python bench/experiments/redis_held.py          # needs redis-server (apt-get install redis-server)

Starts a throwaway ``redis-server`` on a free 127.0.0.1 port (no persistence),
puts one Conv4-64 MAML session (what an adaptation keeps: 440 KB of tensors),
and times ``RedisSessionStore.get`` on a replica that holds it decoded
(``held_bytes``, the default) and on one that holds nothing (``held_bytes=0``:
the tensors travel and are decoded on every get), interleaved, medians of 500
calls, and the decoding alone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from engine_graphs import demo_registry, jobs_for, median_us  # noqa: E402
from local_redis import local_redis  # noqa: E402

from service.engine import Engine  # noqa: E402
from service.redis_store import RedisSessionStore, decode_tensors, encode_tensors  # noqa: E402
from service.sessions import Session, new_session_id  # noqa: E402


def main() -> None:
    with local_redis() as url:
        torch.set_num_threads(1)
        model = demo_registry(["maml"], "cpu").get("maml")
        with torch.no_grad():
            tensors = Engine(threads=1, cpu_traces=0, cpu_scripts=0)._compute(jobs_for(model, 1, "adapt", seed=1))[0]["tensors"]
        holding, fetching = RedisSessionStore(url, 1 << 30), RedisSessionStore(url, 1 << 30, held_bytes=0)
        session = Session(new_session_id(), "maml", None, time.time(), time.time() + 3600, tensors)
        holding.put(session)
        print(f"# one Conv4-64 MAML session, {session.nbytes // 1024} KB of tensors; RedisSessionStore.get, median of 500 calls")
        for _ in range(3):
            held = median_us(lambda: holding.get(session.id, None), 500)
            fetched = median_us(lambda: fetching.get(session.id, None), 500)
            print(f"held by the replica {held:.0f} us   fetched and decoded {fetched:.0f} us")
        blob = encode_tensors(tensors)
        print(f"# of which decoding the tensors: {median_us(lambda: decode_tensors(blob), 500):.0f} us")


if __name__ == "__main__":
    main()
