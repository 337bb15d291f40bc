"""Bounded load test of ``segany serve`` on loopback (a benchmark, not a timed test).

1. Latency: one client, then 8 concurrent clients x 50 predictions each, on one cached image
   (a real 854 x 480 photo from val/DAVIS): errors (must be 0), p50 / p99 / max round trip.
   The server's CPU time per request is reported too: unlike wall-clock latency it does
   not depend on what else the machine is running.
2. Memory: 100 distinct photos uploaded in turn to a server whose embedding cache is bounded
   (``--cache-mb``): the cache's own byte count after every upload must stay under the bound;
   the server's resident memory (VmRSS) is reported too.

The server runs in its own process (uvicorn, as ``segany serve`` does) with the bundled model
when its weights are installed, else the segany-lite architecture with random weights (the
same computation, so the same speed). Run it niced, with one thread, beside other work:

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python benchmarks/server_load.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

DAVIS = Path(__file__).resolve().parents[2] / "shared" / "data" / "val" / "DAVIS" / "images"


def _serve(port: int, cache_mb: int, ready: Any) -> None:
    """Server process: the bundled model, else segany-lite with random weights."""
    import torch
    import uvicorn

    from segany import CheckpointError, build_model
    from segany.modeling import build_sam
    from segany.registry import SEGANY_LITE_CONFIG
    from segany.server import ServerSettings, create_app

    torch.manual_seed(0)
    try:
        model, name = build_model(), "segany-lite (bundled weights)"
    except CheckpointError:
        model, name = build_sam(SEGANY_LITE_CONFIG).eval(), "segany-lite (random weights)"
    app = create_app(model, ServerSettings(cache_bytes=cache_mb * 2**20), model_name=name)
    ready.put(name)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    """CPU time (user + system, all threads) of a process so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentiles(ms: list[float]) -> dict[str, float]:
    arr = np.asarray(ms)
    return {
        "n": len(ms),
        "p50_ms": round(float(np.percentile(arr, 50)), 1),
        "p99_ms": round(float(np.percentile(arr, 99)), 1),
        "max_ms": round(float(arr.max()), 1),
        "mean_ms": round(float(arr.mean()), 1),
    }


async def _client(
    http: httpx.AsyncClient, image_id: str, n: int, rng: np.random.Generator, size: tuple[int, int]
) -> tuple[list[float], list[str]]:
    w, h = size
    times, errors = [], []
    for _ in range(n):
        body = {"points": [[float(rng.uniform(0, w)), float(rng.uniform(0, h))]], "labels": [1]}
        start = time.perf_counter()
        try:
            r = await http.post(f"/v1/images/{image_id}/predict", json=body)
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
            else:
                r.json()  # the client has the masks in hand
        except httpx.HTTPError as exc:
            errors.append(repr(exc))
        times.append((time.perf_counter() - start) * 1000)
    return times, errors


async def _latency(
    base: str, pid: int, photo: Path, clients: int, per_client: int
) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        data = photo.read_bytes()
        start = time.perf_counter()
        r = await http.post("/v1/images", files={"file": (photo.name, data, "image/jpeg")})
        r.raise_for_status()
        info = r.json()
        upload_ms = (time.perf_counter() - start) * 1000
        size = (info["width"], info["height"])
        await _client(http, info["id"], 5, np.random.default_rng(0), size)  # warm-up
        cpu0 = _cpu_s(pid)
        single, single_err = await _client(http, info["id"], 50, np.random.default_rng(1), size)
        cpu1 = _cpu_s(pid)
        start = time.perf_counter()
        results = await asyncio.gather(
            *[
                _client(http, info["id"], per_client, np.random.default_rng(10 + k), size)
                for k in range(clients)
            ]
        )
        wall = time.perf_counter() - start
        cpu2 = _cpu_s(pid)
    times = [t for ts, _ in results for t in ts]
    errors = [e for _, es in results for e in es] + single_err
    return {
        "image": f"{photo.name} ({size[0]} x {size[1]})",
        "upload_and_encode_ms": round(upload_ms, 1),
        "single_client": {
            **_percentiles(single),
            "server_cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / len(single), 1),
        },
        "concurrent": {
            "clients": clients,
            "per_client": per_client,
            **_percentiles(times),
            "throughput_per_s": round(len(times) / wall, 1),
            "server_cpu_ms_per_request": round((cpu2 - cpu1) * 1000 / len(times), 1),
        },
        "errors": len(errors),
        "error_samples": errors[:5],
    }


def _memory(base: str, pid: int, photos: list[Path], bound: int) -> dict[str, Any]:
    rss = [_rss_mib(pid)]
    worst = 0
    errors = 0
    with httpx.Client(base_url=base, timeout=120) as http:
        for p in photos:
            r = http.post("/v1/images", files={"file": (p.name, p.read_bytes(), "image/jpeg")})
            errors += r.status_code != 200
            cache = http.get("/v1/health").json()["cache"]
            worst = max(worst, int(cache["bytes"]))
            rss.append(_rss_mib(pid))
    quarter = max(1, len(photos) // 4)
    return {
        "images": len(photos),
        "errors": errors,
        "cache_bound_mib": bound / 2**20,
        "cache_max_bytes_seen_mib": round(worst / 2**20, 2),
        "cache_within_bound": worst <= bound,
        "cache_entries_at_end": cache["entries"],
        "evictions": cache["evictions"],
        "server_rss_mib": {
            "before": round(rss[0], 1),
            "after_first_upload": round(rss[1], 1),
            "max": round(max(rss), 1),
            "end": round(rss[-1], 1),
            "after_uploads": {str(k): round(rss[k], 1) for k in range(quarter, len(rss), quarter)},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=50)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--cache-mb", type=int, default=64)
    parser.add_argument("--out", default="artifacts/server_load.json")
    args = parser.parse_args(argv)

    photos = sorted(DAVIS.glob("*.jpg"))
    if len(photos) < args.images + 1:
        print(f"need {args.images + 1} photos in {DAVIS}", file=sys.stderr)
        return 1
    port = _free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Queue()
    proc = ctx.Process(target=_serve, args=(port, args.cache_mb, ready), daemon=True)
    proc.start()
    try:
        model = ready.get(timeout=600)
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(base + "/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert proc.pid is not None
        result: dict[str, Any] = {
            "model": model,
            "machine": f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }
        result["latency"] = asyncio.run(
            _latency(base, proc.pid, photos[0], args.clients, args.per_client)
        )
        result["memory"] = _memory(
            base, proc.pid, photos[1 : args.images + 1], args.cache_mb * 2**20
        )
    finally:
        proc.terminate()
        proc.join(10)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lat, mem = result["latency"], result["memory"]
    print(f"model: {result['model']}; {result['machine']}")
    one = lat["single_client"]
    print(
        f"single client: p50 {one['p50_ms']} ms, p99 {one['p99_ms']} ms, "
        f"server CPU {one['server_cpu_ms_per_request']} ms per request"
    )
    c = lat["concurrent"]
    print(
        f"{c['clients']} clients x {c['per_client']}: errors {lat['errors']}, p50 {c['p50_ms']} ms, "
        f"p99 {c['p99_ms']} ms, max {c['max_ms']} ms, {c['throughput_per_s']} predictions/s, "
        f"server CPU {c['server_cpu_ms_per_request']} ms per request"
    )
    print(
        f"{mem['images']} uploads: cache max {mem['cache_max_bytes_seen_mib']} MiB "
        f"(bound {mem['cache_bound_mib']:.0f} MiB, within: {mem['cache_within_bound']}), "
        f"{mem['evictions']} evictions, server RSS {mem['server_rss_mib']}"
    )
    print(f"wrote {out}")
    ok = lat["errors"] == 0 and mem["errors"] == 0 and mem["cache_within_bound"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
