"""A bounded HTTP/1.1 load generator, used only where ``wrk`` is not installed.

``connections`` keep-alive connections each send ``GET {prefix}{n}`` (a fresh ``n`` per
request) back to back for ``seconds``; prints one JSON object with requests/s and latency
percentiles. Run as ``python -m benchmarks.loadgen HOST PORT PREFIX SECONDS CONNECTIONS``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time

from benchmarks.stats import quantile


async def _connection(
    host: str, port: int, prefix: str, deadline: float, ids: itertools.count[int]
) -> list[float]:
    reader, writer = await asyncio.open_connection(host, port)
    latencies: list[float] = []
    try:
        while time.perf_counter() < deadline:
            request = f"GET {prefix}{next(ids)} HTTP/1.1\r\nHost: {host}\r\n\r\n"
            start = time.perf_counter()
            writer.write(request.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
    finally:
        writer.close()
    return latencies


async def _run(
    host: str, port: int, prefix: str, seconds: float, connections: int
) -> dict[str, float]:
    ids = itertools.count(1)
    start = time.perf_counter()
    deadline = start + seconds
    results = await asyncio.gather(
        *(_connection(host, port, prefix, deadline, ids) for _ in range(connections))
    )
    elapsed = time.perf_counter() - start
    latencies = [latency for result in results for latency in result]
    return {
        "requests": len(latencies),
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": quantile(latencies, 0.5) * 1000,
        "p99_ms": quantile(latencies, 0.99) * 1000,
    }


def main(argv: list[str]) -> int:
    """Load ``http://HOST:PORT{PREFIX}{n}`` and print the JSON summary."""
    host, port, prefix, seconds, connections = argv
    summary = asyncio.run(_run(host, int(port), prefix, float(seconds), int(connections)))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
