"""Soak: ten times the daemon's capacity, with disconnecting and slow clients, for a bounded time.

    python -m benchmarks.soak [--duration 60] [--max-requests 3000] [--overload 10] [--device cpu]

Starts `vramlite serve` on the demo model (max_batch_size 4, max_queue 4: capacity 8) in a subprocess on
loopback and drives it with --overload × capacity concurrent clients until --duration seconds or
--max-requests requests. Each request is one of: JSON /generate, streamed /generate read to the end,
streamed and dropped after its first token (a disconnect), streamed and read slowly (a slow reader).
A client told 429 or 503 waits its Retry-After (at most 1 s) before its next request.

Checks, per request: it ends in 200 or in 429/503 with the contract's error body, and within its
deadline (request_timeout + 10 s), never hanging; a dropped stream counts as dropped. After the load
it waits for the daemon to go idle and reads its RSS and open file descriptors against the baseline
taken after warm-up (their peak during the load too), and that no request is left running or waiting.
Prints a table; writes benchmarks/results/soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import numpy as np

from benchmarks.common import print_table, write_results
from benchmarks.daemon import Daemon, daemon

MAX_BATCH_SIZE = 4
MAX_QUEUE = 4
REQUEST_TIMEOUT_S = 30
KINDS = ("json", "stream", "disconnect", "slow_reader")
PROMPTS = ["床前明月光，", "The best way to predict the future is", "白日依山尽，", "A fortune cookie says:",
           "Never trust a man who", "春眠不觉晓，", "If life is a stage,", "学而时习之，"]


@dataclass
class Outcome:
    kind: str
    status: int | str  # an HTTP status, "dropped" (the client hung up on purpose), "hang", or a transport error
    seconds: float
    valid: bool  # the reply had the shape its status promises


def error_body_ok(r: httpx.Response | bytes) -> bool:
    try:
        error = json.loads(r if isinstance(r, bytes) else r.content)["error"]
        return set(error) == {"type", "message"}
    except (ValueError, KeyError, TypeError):
        return False


async def one_request(client: httpx.AsyncClient, kind: str, rng: random.Random) -> tuple[Outcome, float]:
    """One request of `kind`; its outcome and how long the server asked us to wait before the next."""
    body = {"prompt": rng.choice(PROMPTS), "max_tokens": rng.randint(8, 32), "temperature": 0.8,
            "seed": rng.randrange(1 << 30), "stream": kind != "json"}
    start = time.perf_counter()
    retry_after = 0.0
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S + 10):
            async with client.stream("POST", "/generate", json=body) as r:
                if r.status_code != 200:
                    content = await r.aread()
                    retry_after = min(float(r.headers.get("retry-after", 0)), 1.0)
                    return Outcome(kind, r.status_code, time.perf_counter() - start, error_body_ok(content)), \
                        retry_after
                if kind == "json":
                    reply = json.loads(await r.aread())
                    return Outcome(kind, 200, time.perf_counter() - start, "text" in reply), 0.0
                lines = r.aiter_lines()
                done = False
                async for line in lines:
                    if kind == "disconnect" and line.startswith("data: {"):
                        return Outcome(kind, "dropped", time.perf_counter() - start, True), 0.0
                    if kind == "slow_reader":
                        await asyncio.sleep(0.05)
                    done = done or line == "data: [DONE]"
                return Outcome(kind, 200, time.perf_counter() - start, done), 0.0
    except TimeoutError:
        return Outcome(kind, "hang", time.perf_counter() - start, False), 0.0
    except httpx.HTTPError as e:
        return Outcome(kind, type(e).__name__, time.perf_counter() - start, False), 0.0


async def load(served: Daemon, clients: int, duration: float, max_requests: int, seed: int
               ) -> tuple[list[Outcome], float, int, int]:
    """The outcomes, the wall time, and the daemon's peak RSS and open fds sampled during the load."""
    outcomes: list[Outcome] = []
    end = time.perf_counter() + duration
    peak_rss, peak_fds = served.rss_bytes(), served.open_fds()

    async def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        async with httpx.AsyncClient(base_url=served.url, timeout=REQUEST_TIMEOUT_S + 10) as client:
            while time.perf_counter() < end and len(outcomes) < max_requests:
                outcome, wait = await one_request(client, KINDS[i % len(KINDS)], rng)
                outcomes.append(outcome)
                await asyncio.sleep(wait)

    async def sample() -> None:
        nonlocal peak_rss, peak_fds
        while True:
            peak_rss, peak_fds = max(peak_rss, served.rss_bytes()), max(peak_fds, served.open_fds())
            await asyncio.sleep(0.5)

    start = time.perf_counter()
    sampler = asyncio.ensure_future(sample())
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    sampler.cancel()
    return outcomes, time.perf_counter() - start, peak_rss, peak_fds


def metric(served: Daemon, name: str) -> float:
    for line in httpx.get(served.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def wait_idle(served: Daemon, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while metric(served, "vramlite_requests_running") or metric(served, "vramlite_requests_waiting"):
        if time.monotonic() > deadline:
            raise RuntimeError("the daemon did not go idle after the load")
        time.sleep(0.2)


def warm_up(served: Daemon) -> None:
    for prompt in PROMPTS:
        httpx.post(served.url + "/generate", json={"prompt": prompt, "max_tokens": 16}, timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=60, help="seconds of load")
    p.add_argument("--max-requests", type=int, default=3000, help="stop after this many requests")
    p.add_argument("--overload", type=int, default=10, help="concurrent clients per unit of capacity")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    capacity = MAX_BATCH_SIZE + MAX_QUEUE
    clients = args.overload * capacity

    with daemon(device=args.device, max_batch_size=MAX_BATCH_SIZE, max_queue=MAX_QUEUE,
                request_timeout=REQUEST_TIMEOUT_S) as served:
        warm_up(served)
        time.sleep(1)
        rss_before, fds_before = served.rss_bytes(), served.open_fds()
        outcomes, wall, peak_rss, peak_fds = asyncio.run(load(served, clients, args.duration, args.max_requests,
                                                              args.seed))
        wait_idle(served)
        time.sleep(2)
        rss_after, fds_after = served.rss_bytes(), served.open_fds()
        left = {"running": metric(served, "vramlite_requests_running"),
                "waiting": metric(served, "vramlite_requests_waiting")}

    rows = []
    for kind in ("all", *KINDS):
        mine = [o for o in outcomes if kind in ("all", o.kind)]
        ok = [o.seconds for o in mine if o.status == 200]
        p50, p99 = (np.percentile(ok, [50, 99]) if ok else (float("nan"),) * 2)
        statuses = Counter(str(o.status) for o in mine)
        rows.append({"requests": kind, "n": len(mine), **{f"status_{s}": n for s, n in sorted(statuses.items())},
                     "invalid": sum(not o.valid for o in mine), "p50_s": round(float(p50), 3),
                     "p99_s": round(float(p99), 3)})
    columns = ["requests", "n", *sorted({k for r in rows for k in r if k.startswith("status_")}), "invalid",
               "p50_s", "p99_s"]
    for row in rows:
        for c in columns:
            row.setdefault(c, 0)
    print_table(rows, columns)
    memory = {"rss_before_mib": round(rss_before / 2**20, 1), "rss_peak_mib": round(peak_rss / 2**20, 1),
              "rss_after_mib": round(rss_after / 2**20, 1), "fds_before": fds_before, "fds_peak": peak_fds,
              "fds_after": fds_after, "left_running": left["running"], "left_waiting": left["waiting"]}
    print("  ".join(f"{k}={v}" for k, v in memory.items()))
    bad = {s for o in outcomes for s in [str(o.status)] if s not in ("200", "429", "503", "dropped")}
    print(f"clients={clients} capacity={capacity} wall_s={wall:.1f} "
          f"unexpected_statuses={sorted(bad) or 'none'} invalid_replies={sum(not o.valid for o in outcomes)}")
    path = write_results("soak", rows, memory=memory, clients=clients, capacity=capacity, wall_s=round(wall, 1),
                         device=args.device, duration_s=args.duration, max_requests=args.max_requests)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
