#!/usr/bin/env python3
"""Holds N idle HTTP/1.1 keep-alive connections to a server, for bench/idle.sh. Stdlib only.

  idle-clients.py HOST PORT PATH N BATCH [MAX_WAIT]

Three steps, each announced by one line on stdout; SIGUSR1 starts the next one:

  warm STATUS           one request on a connection of its own, the response read whole, the
                        connection closed
  open OK FAILED [WHY]  N connections opened BATCH at a time; on each, one `GET PATH` and its whole
                        response read (status 200 and keep-alive required, or it counts as failed
                        and is closed); then every one is held idle
  still-open K          how many of the OK connections the server has not closed (nor sent
                        anything on) since; then all are closed and the script exits

Every step is bounded: each connection's connect and exchange must finish within 30 s, opening
all of them within MAX_WAIT seconds (default 300), and each wait for SIGUSR1 lasts MAX_WAIT at
most. Past a bound the script says so on stderr and exits with status 2.
"""
import asyncio
import collections
import signal
import sys

EXCHANGE_TIMEOUT = 30


class Refused(Exception):
    """The server answered, but not in a way that leaves an idle keep-alive connection."""


async def exchange(host, port, request):
    """Connects, sends `request`, reads the whole response; returns (status, reader, writer)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers = {}
        for line in lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip().lower()
        if "chunked" in headers.get("transfer-encoding", ""):
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    break
                await reader.readexactly(size + 2)
        elif "content-length" in headers:
            await reader.readexactly(int(headers["content-length"]))
        else:
            raise Refused("response framed by close")
        if "close" in headers.get("connection", ""):
            raise Refused("Connection: close")
        return status, reader, writer
    except BaseException:
        writer.close()
        raise


async def main(host, port, path, n, batch, max_wait):
    loop = asyncio.get_running_loop()
    go = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, go.set)
    request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "User-Agent: kaguard-bench-idle\r\n\r\n").encode()

    def bail(what):
        print(f"idle-clients.py: {what}", file=sys.stderr, flush=True)
        sys.exit(2)

    async def next_step():
        try:
            await asyncio.wait_for(go.wait(), max_wait)
        except asyncio.TimeoutError:
            bail(f"no SIGUSR1 within {max_wait:g} s")
        go.clear()

    try:
        status, _, writer = await asyncio.wait_for(exchange(host, port, request), EXCHANGE_TIMEOUT)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, Refused, ValueError) as e:
        bail(f"warm-up request failed: {type(e).__name__}: {e}")
    writer.close()
    await writer.wait_closed()
    print(f"warm {status}", flush=True)
    await next_step()

    held = []  # (writer, task that ends when the server closes or sends anything)
    failures = collections.Counter()

    async def open_one():
        try:
            status, reader, writer = await asyncio.wait_for(
                exchange(host, port, request), EXCHANGE_TIMEOUT)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, Refused,
                ValueError) as e:
            failures[type(e).__name__] += 1
            return
        if status != 200:
            failures[f"status-{status}"] += 1
            writer.close()
            return
        held.append((writer, asyncio.ensure_future(reader.read(1))))

    deadline = loop.time() + max_wait
    for first in range(0, n, batch):
        if loop.time() > deadline:
            bail(f"opening {n} connections took longer than {max_wait:g} s ({len(held)} open)")
        await asyncio.gather(*(open_one() for _ in range(min(batch, n - first))))
    why = ",".join(f"{k}={v}" for k, v in sorted(failures.items()))
    print(f"open {len(held)} failed {sum(failures.values())} {why}".rstrip(), flush=True)
    await next_step()

    print(f"still-open {sum(1 for _, watch in held if not watch.done())}", flush=True)
    for writer, watch in held:
        watch.cancel()
        writer.close()


if __name__ == "__main__":
    if len(sys.argv) not in (6, 7):
        sys.exit(__doc__)
    args = sys.argv[1:]
    asyncio.run(main(args[0], int(args[1]), args[2], int(args[3]), int(args[4]),
                     float(args[5]) if len(args) == 6 else 300.0))
