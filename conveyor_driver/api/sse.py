"""Reading a Server-Sent Events stream (the server's live log relay) into its events' data.

Only what the log streams need: the ``data`` field of each event. The server and proxies
frame events differently (``\\r\\n`` or ``\\n`` line ends, chunks cut anywhere, comments as
heartbeats), so the parser works on bytes as they arrive rather than on aiohttp's lines,
whose length limit a long log line would pass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp

#: A line longer than this is no log line: the stream is broken, not slow.
LINE_LIMIT = 1024 * 1024


async def event_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The ``data`` of each Server-Sent Event; comments (heartbeats) and other fields skipped.

    An event ends at an empty line; one cut off by the end of the stream is dropped, as the
    SSE specification says.
    """
    buffer = bytearray()
    data: list[str] = []
    async for chunk in content.iter_any():
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end]).rstrip(b"\r")
            del buffer[: end + 1]
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
                continue
            if line.startswith(b":"):
                continue
            field, _, value = line.partition(b":")
            if field == b"data":
                data.append(value.removeprefix(b" ").decode("utf-8", errors="replace"))
        if len(buffer) > LINE_LIMIT:
            raise aiohttp.ClientPayloadError("a Server-Sent Events line is too long")
