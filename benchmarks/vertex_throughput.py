"""Throughput of the Vertex backend's online path against the local Vertex REST server.

The server (a separate process, so it does not share the client's GIL) answers every call after
a fixed latency L. N rows at concurrency C cannot finish faster than N*L/C; the ratio
bound / measured says how close VertexLLM gets (target >= 0.9 for N=2000, L=100 ms, C=32).
With --rpm R the client-side limiter admits at most R requests in any --rate-window-s W, so the
last ceil(N/R)-th chunk of rows cannot start before (ceil(N/R) - 1) * W, and those r rows still
take ceil(r/C) * L at concurrency C: the run cannot finish before the sum; that ratio is printed
too.

    python benchmarks/vertex_throughput.py --rows 2000 --latency-ms 100 --concurrency 32
    python benchmarks/vertex_throughput.py --rows 300 --concurrency 32 --rpm 100 --rate-window-s 1
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from promptopt_dagster.llm.base import ChatRequest  # noqa: E402
from promptopt_dagster.llm.vertex import VertexLLM  # noqa: E402
from promptopt_dagster.llm.vertex_options import VertexOptions  # noqa: E402
from promptopt_dagster_tests.support.vertex_process import VertexServerProcess  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rpm", type=float, default=None, help="client-side requests per rate window")
    parser.add_argument("--rate-window-s", type=float, default=60.0, help="the rate limiter's window")
    parser.add_argument("--warmup", type=int, default=64, help="calls before timing (connections, imports)")
    args = parser.parse_args(argv)

    requests = [ChatRequest.of([{"role": "user", "content": f"row {i}: what is {i} + {i}?"}], max_tokens=16)
                for i in range(args.rows)]
    with VertexServerProcess(latency_ms=args.latency_ms) as server:
        def client(rpm: float | None) -> VertexLLM:
            options = VertexOptions(project_id="bench", location="us-central1", api_endpoint=server.base_url,
                                    access_token="bench-token", concurrency=args.concurrency,
                                    requests_per_minute=rpm, rate_window_s=args.rate_window_s, timeout_s=30.0)
            return VertexLLM(options, "gemini-2.0-flash")

        if args.warmup:
            client(None).generate(requests[: args.warmup])
        llm = client(args.rpm)
        started = time.perf_counter()
        replies = llm.generate(requests)
        measured = time.perf_counter() - started

    failed = sum(not r.ok for r in replies)
    in_order = all(r.text == f"echo: {q.messages[-1].content}"
                   for r, q in zip(replies, requests, strict=True))
    latency = args.latency_ms / 1000.0
    bound = args.rows * latency / args.concurrency
    print(f"rows={args.rows} latency={args.latency_ms:g} ms concurrency={args.concurrency} "
          f"rpm={args.rpm or '-'} window={args.rate_window_s:g} s")
    print(f"measured wall time      {measured:8.3f} s   ({args.rows / measured:,.0f} rows/s), "
          f"failed={failed}, in order={in_order}")
    print(f"concurrency bound N*L/C {bound:8.3f} s   ratio bound/measured = {bound / measured:.3f}")
    if args.rpm:
        windows = math.ceil(args.rows / args.rpm)
        last_chunk = args.rows - (windows - 1) * args.rpm
        rate_bound = (windows - 1) * args.rate_window_s + math.ceil(last_chunk / args.concurrency) * latency
        print(f"rate-limit bound        {rate_bound:8.3f} s   "
              f"ratio bound/measured = {rate_bound / measured:.3f}")
        print(f"combined bound (max)    {max(bound, rate_bound):8.3f} s   "
              f"ratio = {max(bound, rate_bound) / measured:.3f}")
    return 0 if failed == 0 and in_order else 1


if __name__ == "__main__":
    raise SystemExit(main())
