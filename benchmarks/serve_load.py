"""Serving under load on loopback: continuous batching vs one sequence at a time, same daemon, same run.

    python -m benchmarks.serve_load [--clients 16] [--requests 256] [--max-tokens 64] [--batch 16]
                                    [--device cpu]

Starts `vramlite serve` on the shipped demo model twice, each time in a subprocess on a free 127.0.0.1
port: with max_batch_size=--batch (continuous batching), then with max_batch_size=1. Each gets the same
bounded load: --requests greedy streamed /generate requests over distinct prompts, sent by --clients
concurrent clients (httpx.AsyncClient, SSE), each client sending its next request when the last one ends.
From the client's clock at each SSE event: aggregate generated tokens/s (all tokens / wall time of the
load), time to first token (send → first token event) and inter-token latency (between the token events
of one stream), p50 and p99, and errors (an HTTP error status, an `event: error`, no `[DONE]`); also
the clients' own CPU time, as they share the cores with the daemon. Goal on CPU: batching ≥ 4x the
tokens/s at 16 clients, 0 errors. Prints a table; writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import httpx
import numpy as np
from httpx_sse import aconnect_sse

from benchmarks.common import print_table, write_results
from benchmarks.daemon import daemon
from vramlite import models as demo_models

PROMPTS = [
    "The best way to predict the future is", "A fortune cookie says:", "Never trust a man who",
    "床前明月光，", "白日依山尽，", "春眠不觉晓，", "Q: Why did the chicken cross the road?\nA:",
    "If life is a stage,", "You will meet a tall dark stranger", "It is a truth universally acknowledged",
    "学而时习之，", "The only thing we have to fear is", "Immature poets imitate,", "All that glitters",
    "Today is the first day of", "海内存知己，", "Beware of the", "When in doubt,", "千里之行，",
    "Love is", "There are two kinds of people:", "He who laughs last", "天下大势，", "A penny saved",
]
COLUMNS = ["mode", "max_batch_size", "clients", "requests", "errors", "tokens", "wall_s", "client_cpu_s",
           "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "speedup"]


@dataclass
class RequestResult:
    """What one client saw of one streamed request, on its own clock."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    error: str | None = None


async def stream_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> RequestResult:
    """One greedy streamed /generate, timestamping each token event as it arrives."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    result = RequestResult(time.perf_counter())
    done = False
    try:
        async with aconnect_sse(client, "POST", "/generate", json=body) as source:
            if source.response.status_code != 200:
                result.error = f"HTTP {source.response.status_code}"
                return result
            async for event in source.aiter_sse():
                if event.event == "error":
                    result.error = json.loads(event.data)["error"]["type"]
                    return result
                if event.data == "[DONE]":
                    done = True
                elif "token" in json.loads(event.data):
                    result.token_times.append(time.perf_counter())
    except httpx.HTTPError as e:
        result.error = type(e).__name__
    if not done and result.error is None:
        result.error = "no [DONE]"
    return result


async def drive(url: str, clients: int, requests: int, max_tokens: int
                ) -> tuple[list[RequestResult], float, float]:
    """`requests` requests from `clients` concurrent clients: the results, the wall time of the load and the
    CPU time the clients themselves took meanwhile (on the same cores as the daemon)."""
    todo = iter(range(requests))  # shared: each client takes the next request when its last one ends

    async def client_loop(client: httpx.AsyncClient) -> list[RequestResult]:
        return [await stream_request(client, PROMPTS[i % len(PROMPTS)], max_tokens) for i in todo]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await stream_request(client, PROMPTS[0], 4)  # warm-up: first-call costs stay out of the figures
        start, start_cpu = time.perf_counter(), time.process_time()
        per_client = await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall, client_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return [r for results in per_client for r in results], wall, client_cpu


def percentiles_ms(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(values, [50, 99]) * 1000
    return round(float(p50), 1), round(float(p99), 1)


def summarize(mode: str, max_batch_size: int, clients: int, results: list[RequestResult], wall: float,
              client_cpu: float) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    tokens = sum(len(r.token_times) for r in results)
    ttft = [r.token_times[0] - r.sent for r in ok if r.token_times]
    itl = [b - a for r in ok for a, b in pairwise(r.token_times)]
    (ttft_p50, ttft_p99), (itl_p50, itl_p99) = percentiles_ms(ttft), percentiles_ms(itl)
    return {"mode": mode, "max_batch_size": max_batch_size, "clients": clients, "requests": len(results),
            "errors": len(results) - len(ok), "error_kinds": sorted({r.error for r in results if r.error}),
            "tokens": tokens, "wall_s": round(wall, 2), "client_cpu_s": round(client_cpu, 2),
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": ttft_p50, "ttft_p99_ms": ttft_p99, "itl_p50_ms": itl_p50, "itl_p99_ms": itl_p99}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--requests", type=int, default=256,
                   help="requests in all, per mode (many, so the tail of the load, when few remain, weighs little)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request (greedy)")
    p.add_argument("--batch", type=int, default=16, help="max_batch_size of the continuous-batching run")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    rows = []
    for mode, max_batch_size in (("continuous batching", args.batch), ("one at a time", 1)):
        with daemon(device=args.device, max_batch_size=max_batch_size, max_queue=args.clients) as served:
            load = asyncio.run(drive(served.url, args.clients, args.requests, args.max_tokens))
        rows.append(summarize(mode, max_batch_size, args.clients, *load))
    batched, single = rows
    batched["speedup"] = round(batched["tokens_per_s"] / single["tokens_per_s"], 2)
    print_table(rows, COLUMNS)
    path = write_results("serve_load", rows, model=str(demo_models.path()), device=args.device,
                         max_tokens=args.max_tokens, goal="continuous batching >= 4x tokens/s at 16 clients, "
                         "0 errors")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
