"""A long mixed load on one service: does its memory level off, and does every request get the answer it should?

    python bench/experiments/soak.py                        # 6 minutes, a 16 MiB session budget
    python bench/experiments/soak.py --minutes 20 --server METALEARN_CACHE_BYTES=4194304
    python bench/experiments/soak.py --redis                # sessions in a throwaway redis-server
    python bench/experiments/soak.py --reload-every 20      # and a new version of both models every 20 s

Starts one service (``bench/service_bench.py``'s checkpoints: Conv4-64 MAML
and ANIL, 5-way, 10 inner steps) with a small session budget, so that
sessions are evicted all the time, and runs ``--concurrency`` clients for
``--minutes``, each sending a random mix of what an application sends:
adaptations that keep a session (a random ``ttl_s`` of 2-20 s, so sessions
expire too), predictions with a recent session (its answer is 200, or 404 once
the session expired, was evicted or deleted), stateless adapt-and-predicts,
session deletions, and bad requests of every kind the issue lists (malformed
base64, a byte count that does not match the shape, non-finite values, labels
out of range, an unknown model or session, ``inner_steps`` over the limit,
broken JSON), each of which must be a 4xx.

Every ``--every`` seconds it prints the server's resident memory (``VmRSS``),
its threads and open file descriptors (``/proc``), the live sessions and their
bytes, the CPU traces and compiled adaptations the engine holds (caches that
fill as request shapes appear: ``/metrics``) and the requests answered so far. At the end: the
answers by kind and status, any unexpected one (a 5xx, a 2xx to a bad
request, ...), and how much the resident memory grew over the last two thirds
of the run (after the first third, which loads the traces and compilations).
Exits 1 when an answer was unexpected. With ``--redis`` the sessions live in a
throwaway ``redis-server`` (``bench/local_redis.py``) under the same budget, and
the replica holds at most ``METALEARN_REDIS_HELD_BYTES`` of them decoded (8
MiB here, so that held sessions are dropped all the time too). With
``--reload-every S``, every S seconds both checkpoints are written again as new
versions (the same weights, another manifest) and the server gets a
``SIGHUP``: it loads them (sessions of the old versions answer 404, which a
session predict may get anyway) while the clients go on; the end says how many
reloads were sent and how many the server completed
(``metalearn_model_reloads_total``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import service_bench as sb  # noqa: E402
from local_redis import local_redis  # noqa: E402

KINDS = {"adapt": 15, "session": 45, "stateless": 20, "delete": 5, "bad": 15}  # relative frequencies
EXPECTED = {"adapt": {201}, "session": {200, 404}, "stateless": {200}, "delete": {204, 404}}


def proc_status(pid: int) -> dict[str, float]:
    """The server's resident memory (MB), its peak (MB), threads and open file descriptors."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                fields[name] = float(value.split()[0])
    return {"rss_mb": fields["VmRSS"] / 1024, "peak_mb": fields["VmHWM"] / 1024, "threads": fields["Threads"],
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def bad_bodies(batch) -> list[tuple[str, str, bytes]]:
    """(method, path, body) of requests that must each be answered with a 4xx."""
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    support = {"x": sb.encode(sx), "y": sb.encode(sy, "int64")}

    def stateless(**changes):
        body = {"support": dict(support), "query": {"x": sb.encode(qx)}}
        for key, value in changes.items():
            if key in ("x", "y"):
                body["support"][key] = value
            else:
                body[key] = value
        return ("POST", "/v1/models/maml/predict", json.dumps(body).encode())

    wrong_count = dict(sb.encode(sx), shape=[5, 1, 28, 27])
    nan = sx.clone()
    nan[0, 0, 0, 0] = float("nan")
    return [
        stateless(x=dict(sb.encode(sx), base64="not*base64!")),
        stateless(x=wrong_count),
        stateless(x=sb.encode(nan)),
        stateless(y=sb.encode(sy + 5, "int64")),  # labels out of [0, 5)
        stateless(inner_steps=100_000),
        ("POST", "/v1/models/no-such-model/predict", stateless()[2]),
        ("POST", "/v1/sessions/no-such-session/predict", json.dumps({"x": sb.encode(qx)}).encode()),
        ("POST", "/v1/models/anil/adapt", b'{"support": {"x": [[1, 2'),  # broken JSON
    ]


async def client(port: int, batch, bad: list, sessions: list[str], counts: collections.Counter, unexpected: list, deadline: float, seed: int) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items())
    connection = sb.Connection(port)
    await connection.open()
    try:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            i = rng.randrange(len(batch.support_x))
            model = rng.choice(["maml", "anil"])
            support = {"x": sb.encode(batch.support_x[i]), "y": sb.encode(batch.support_y[i], "int64")}
            query = {"x": sb.encode(batch.query_x[i])}
            if kind == "session" and not sessions:
                kind = "adapt"
            if kind == "adapt":
                method, path, body = "POST", f"/v1/models/{model}/adapt", json.dumps({"support": support, "ttl_s": rng.randint(2, 20)}).encode()
            elif kind == "session":
                method, path, body = "POST", f"/v1/sessions/{rng.choice(sessions[-200:])}/predict", json.dumps(query).encode()
            elif kind == "stateless":
                method, path, body = "POST", f"/v1/models/{model}/predict", json.dumps({"support": support, "query": query}).encode()
            elif kind == "delete":
                method, path, body = "DELETE", f"/v1/sessions/{rng.choice(sessions[-200:]) if sessions else 'none'}", b""
            else:
                method, path, body = rng.choice(bad)
            status, payload = await connection.request(method, path, body)
            counts[kind, status] += 1
            ok = 400 <= status < 500 if kind == "bad" else status in EXPECTED[kind]
            if not ok:
                unexpected.append((kind, method, path, status, payload[:300]))
            elif kind == "adapt":
                sessions.append(json.loads(payload)["session_id"])
                del sessions[:-1000]
    finally:
        connection.close()


async def reload_now_and_then(process, model_dir: Path, every: float, deadline: float) -> int:
    """Every ``every`` seconds until ``deadline``: a new version of each checkpoint, then SIGHUP. The reloads sent."""
    sent = 0
    while every > 0 and time.monotonic() + every < deadline:
        await asyncio.sleep(every)
        for checkpoint in model_dir.glob("*.safetensors"):
            await asyncio.to_thread(sb.publish_new_version, checkpoint, sent + 1)
        process.send_signal(signal.SIGHUP)
        sent += 1
    return sent


async def soak(process, port: int, batch, args, model_dir: Path) -> tuple[collections.Counter, list, list[dict], int]:
    counts: collections.Counter = collections.Counter()
    unexpected: list = []
    sessions: list[str] = []
    samples: list[dict] = []
    start = time.monotonic()
    deadline = start + 60 * args.minutes
    bad = bad_bodies(batch)
    clients = asyncio.gather(*[client(port, batch, bad, sessions, counts, unexpected, deadline, seed) for seed in range(args.concurrency)])

    async def sample():
        while time.monotonic() < deadline + args.every:
            names = ("metalearn_sessions_live", "metalearn_sessions_bytes", "metalearn_cpu_traces", "metalearn_cpu_scripts")
            metrics = await asyncio.to_thread(lambda: {name: sb.metric_total(port, name) for name in names})
            row = {"t_s": time.monotonic() - start, **proc_status(process.pid), "sessions": metrics["metalearn_sessions_live"],
                   "session_mb": metrics["metalearn_sessions_bytes"] / 2**20, "answered": sum(counts.values())}
            samples.append(row)
            print(f"{row['t_s']:7.0f} s  RSS {row['rss_mb']:7.1f} MB (peak {row['peak_mb']:7.1f})  threads {row['threads']:3.0f}  "
                  f"fds {row['fds']:3d}  sessions {row['sessions']:4.0f} ({row['session_mb']:5.1f} MB)  traces {metrics['metalearn_cpu_traces']:3.0f}  "
                  f"scripts {metrics['metalearn_cpu_scripts']:2.0f}  answered {row['answered']}", flush=True)
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(args.every, max(0.0, deadline - time.monotonic())))

    _, _, reloads = await asyncio.gather(clients, sample(), reload_now_and_then(process, model_dir, args.reload_every, deadline))
    return counts, unexpected, samples, reloads


def reload_outcomes(port: int) -> dict[str, int]:
    """``metalearn_model_reloads_total`` by outcome (done, failed)."""
    import httpx

    outcomes = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith("metalearn_model_reloads_total{"):
            outcomes[line.split('outcome="', 1)[1].split('"', 1)[0]] = int(float(line.rsplit(" ", 1)[1]))
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=6.0)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--every", type=float, default=20.0, help="seconds between samples")
    parser.add_argument("--server", default=f"METALEARN_CACHE_BYTES={16 * 2**20}", help='the service\'s settings, "NAME=VALUE,..."')
    parser.add_argument("--redis", action="store_true", help="sessions in a throwaway redis-server")
    parser.add_argument("--reload-every", type=float, default=0.0, help="seconds between new model versions and a SIGHUP (0: none)")
    args = parser.parse_args()
    with local_redis() if args.redis else contextlib.nullcontext() as url:
        if url:
            args.server = ",".join(filter(None, [f"METALEARN_SESSION_BACKEND=redis,METALEARN_REDIS_URL={url},METALEARN_REDIS_HELD_BYTES={8 * 2**20}", args.server]))
        run(args)


def run(args) -> None:
    work, model_dir = sb.checkpoint_workspace("soak_")
    batch, origin = sb.make_tasks(64)
    [(process, port)] = sb.start_configured([args.server], model_dir, work)
    try:
        print(f"# {args.minutes:g} min, {args.concurrency} clients, settings {args.server or 'defaults'}; tasks: {origin}")
        counts, unexpected, samples, reloads = asyncio.run(soak(process, port, batch, args, model_dir))
        alive = process.poll() is None
        reloaded = reload_outcomes(port) if alive else {}
    finally:
        process.terminate()
        process.wait(15)
    print("# answers by kind and status: " + ", ".join(f"{kind} {status}: {n}" for (kind, status), n in sorted(counts.items())))
    settled = [row for row in samples if row["t_s"] >= samples[-1]["t_s"] / 3]
    first, last = settled[0], samples[-1]
    minutes = max(last["t_s"] - first["t_s"], 1e-9) / 60
    print(f"# after the first third: RSS {first['rss_mb']:.1f} -> {last['rss_mb']:.1f} MB ({last['rss_mb'] - first['rss_mb']:+.1f} MB, "
          f"{(last['rss_mb'] - first['rss_mb']) / minutes:+.2f} MB/min), lowest {min(r['rss_mb'] for r in settled):.1f}, "
          f"highest {max(r['rss_mb'] for r in settled):.1f}; threads {first['threads']:.0f} -> {last['threads']:.0f}, "
          f"fds {first['fds']} -> {last['fds']}; server {'alive' if alive else 'DEAD'} at the end")
    if args.reload_every:
        print(f"# reloads: {reloads} sent; the server's by outcome: {reloaded}")
    for kind, method, path, status, payload in unexpected[:20]:
        print(f"UNEXPECTED {kind}: {method} {path} -> {status} {payload!r}")
    print(f"# unexpected answers: {len(unexpected)}")
    sys.exit(1 if unexpected or not alive else 0)


if __name__ == "__main__":
    main()
