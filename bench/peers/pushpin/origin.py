#!/usr/bin/env python3
"""The origin behind Pushpin for the benchmark: answers every GET /sub/<app>/<user> with a GRIP
hold-stream response, so that Pushpin keeps the client's stream open and subscribed to the
channels "<app>.<user>" and "<app>.broadcast". The first body bytes ("retry: 3000") reach the
client at once, which is what sse-bench times as "stream established".

asyncio with keep-alive rather than http.server: a thread per request could not keep up with a
connect storm, and Pushpin then answers 502, which would measure this script, not Pushpin.

Usage: origin.py PORT [PING_SECONDS]
"""
import asyncio
import sys

BODY = b"retry: 3000\n\n"


def response(path: bytes, ping: int) -> bytes:
    parts = path.split(b"?", 1)[0].strip(b"/").split(b"/")
    if len(parts) != 3 or parts[0] != b"sub" or not parts[1] or not parts[2]:
        return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    app, user = parts[1].decode("latin-1"), parts[2].decode("latin-1")
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: text/event-stream\r\n"
        "Cache-Control: no-cache\r\n"
        "Grip-Hold: stream\r\n"
        f"Grip-Channel: {app}.{user}, {app}.broadcast\r\n"
        # Pings on, shaped like sse-gateway's.
        f"Grip-Keep-Alive: event: ping\\ndata: null\\n\\n; format=cstring; timeout={ping}\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    )
    return head.encode("latin-1") + BODY


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ping: int):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].split(b" ")
            if len(line) < 2:
                break
            writer.write(response(line[1], ping))
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def main():
    port = int(sys.argv[1])
    ping = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    server = await asyncio.start_server(
        lambda r, w: serve(r, w, ping), "127.0.0.1", port, backlog=4096
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
