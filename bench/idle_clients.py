#!/usr/bin/env python3
"""Open N idle, fully authenticated PostgreSQL client connections and hold them.

Used by bench/run.sh to measure a pooler's resident memory per idle client.

Each connection goes through the normal startup + SCRAM handshake (asyncpg
returns from connect() only after ReadyForQuery) and then does nothing.
Once every connection has been attempted the script prints one line

    ready opened=<n> failed=<m> seconds=<t>

on stdout, then holds the connections until stdin reaches EOF, SIGINT/SIGTERM
arrives, or --hold-timeout seconds pass, and finally closes them.

The password is read from $PGPASSWORD (never from argv).
Exit status: 0 if all connections opened, 1 otherwise.
"""

import argparse
import asyncio
import os
import signal
import sys
import threading
import time

import asyncpg


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", default="bench")
    p.add_argument("--dbname", default="bench")
    p.add_argument("-n", "--clients", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=64,
                   help="max handshakes in flight at once")
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument("--retries", type=int, default=3,
                   help="attempts per connection before counting it failed")
    p.add_argument("--open-timeout", type=float, default=600.0,
                   help="give up opening after this many seconds")
    p.add_argument("--hold-timeout", type=float, default=900.0,
                   help="close everything after this many seconds regardless")
    return p.parse_args()


async def main() -> int:
    args = parse_args()
    password = os.environ.get("PGPASSWORD")
    if not password:
        print("PGPASSWORD is not set", file=sys.stderr)
        return 2

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    # stdin EOF => stop. A thread keeps this independent of the event loop.
    def watch_stdin():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except Exception:
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()

    sem = asyncio.Semaphore(args.concurrency)
    conns = []
    errors = []

    async def open_one():
        async with sem:
            last = None
            for attempt in range(args.retries):
                if stop.is_set():
                    return
                try:
                    c = await asyncpg.connect(
                        host=args.host,
                        port=args.port,
                        user=args.user,
                        password=password,
                        database=args.dbname,
                        # No SSLRequest / GSSENCRequest preamble: plain TCP.
                        ssl=False,
                        # We only connect; never prepare anything.
                        statement_cache_size=0,
                        # asyncpg always sends client_encoding='utf-8' (the
                        # value includes the single quotes) plus user and
                        # database in the startup packet; add nothing else
                        # (poolers reject unknown startup parameters).
                        server_settings={},
                        # Never run a probe query (PGTARGETSESSIONATTRS
                        # could otherwise make asyncpg SELECT after login).
                        target_session_attrs="any",
                        timeout=args.connect_timeout,
                    )
                    conns.append(c)
                    return
                except Exception as e:  # noqa: BLE001 - report any failure
                    last = e
                    await asyncio.sleep(0.2 * (attempt + 1))
            errors.append(last)

    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(open_one()) for _ in range(args.clients)]
    done, pending = await asyncio.wait(tasks, timeout=args.open_timeout)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        errors.append(TimeoutError(f"{len(pending)} connections still pending "
                                   f"after {args.open_timeout}s"))
    secs = time.monotonic() - t0
    failed = args.clients - len(conns)

    if errors:
        kinds = {}
        for e in errors:
            k = f"{type(e).__name__}: {e}"
            kinds[k] = kinds.get(k, 0) + 1
        for k, n in sorted(kinds.items(), key=lambda kv: -kv[1])[:5]:
            print(f"idle_clients: {n} x {k}", file=sys.stderr)

    print(f"ready opened={len(conns)} failed={failed} seconds={secs:.1f}",
          flush=True)

    try:
        await asyncio.wait_for(stop.wait(), timeout=args.hold_timeout)
    except asyncio.TimeoutError:
        print("idle_clients: hold timeout reached, closing", file=sys.stderr)

    await asyncio.gather(*(c.close(timeout=5) for c in conns),
                         return_exceptions=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
