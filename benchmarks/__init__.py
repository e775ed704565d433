"""asgi-perfmon against a bare app and its peers: ``python -m benchmarks`` (``make bench``).

Sections: ``inprocess`` (per-request overhead, no network), ``http`` (uvicorn under wrk),
``scrape`` (``/metrics`` render time, size and event-loop stall), ``cardinality`` (memory and
series against distinct raw paths) and ``pool_cache`` (``bench_pool_cache.py``). Results go to
``benchmarks/results/`` as JSON, Markdown and a PNG chart.
"""
