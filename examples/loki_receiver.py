"""A stand-in for Grafana Loki that prints what a driver pushes, for trying the Loki sink.

    python examples/loki_receiver.py --port 3100
    CONVEYOR_LOKI_URL=http://127.0.0.1:3100 make demo

It accepts Loki's push API (``POST /loki/api/v1/push``, gzip-encoded JSON) and prints each
line with its labels and structured metadata. Real Loki stores them instead.
"""

from __future__ import annotations

import argparse
import gzip

import orjson
from aiohttp import web


async def push(request: web.Request) -> web.Response:
    body = await request.read()
    if body[:2] == b"\x1f\x8b":  # aiohttp may already have undone Content-Encoding: gzip
        body = gzip.decompress(body)
    for stream in orjson.loads(body)["streams"]:
        labels = ",".join(f"{k}={v}" for k, v in sorted(stream["stream"].items()))
        for value in stream["values"]:
            metadata = value[2] if len(value) > 2 else {}
            print(f"{{{labels}}} {value[1]}  {metadata}", flush=True)
    return web.Response(status=204)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3100)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_post("/loki/api/v1/push", push)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
