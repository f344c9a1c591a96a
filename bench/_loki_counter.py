"""A minimal Loki push receiver for the log benchmark, run in its own process.

It decodes each push as Loki would (gzip, JSON) and counts the entries; ``GET /count``
answers the total, so the benchmark can tell when every line has arrived.
"""

from __future__ import annotations

import gzip
import sys

import orjson
from aiohttp import web

_received = web.AppKey("received", list)


async def push(request: web.Request) -> web.Response:
    body = await request.read()
    if body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    streams = orjson.loads(body)["streams"]
    request.app[_received][0] += sum(len(stream["values"]) for stream in streams)
    return web.Response(status=204)


async def count(request: web.Request) -> web.Response:
    return web.Response(text=str(request.app[_received][0]))


def main() -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_received] = [0]
    app.router.add_post("/loki/api/v1/push", push)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
