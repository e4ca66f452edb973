"""A fault-injecting HTTP proxy for the remote-shard tests (asyncio, standard library only).

It sits between a client and one upstream HTTP server (nginx, moto's S3 server). For each request
it draws, from a seeded generator, one of:

- `error`: answer 503 (or --status) itself, without asking upstream;
- `drop`: relay the upstream's answer but cut the connection after a random number of bytes
  (somewhere in the headers or the body, as a failing network would);
- `slow`: wait --slow-s seconds before relaying anything (a client with a shorter timeout fails);
- nothing: relay the answer whole.

`--only SUBSTRING` limits the faults to request paths containing it. Counts of each outcome are
written as JSON to --stats after every request, so a test can check faults really happened.

    python faultproxy.py --listen 18080 --upstream 127.0.0.1:8080 --drop 0.4 --error 0.2 --seed 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    p.add_argument("--upstream", required=True, help="HOST:PORT of the real server")
    p.add_argument("--drop", type=float, default=0.0, help="probability of cutting a response")
    p.add_argument("--error", type=float, default=0.0, help="probability of answering --status")
    p.add_argument("--slow", type=float, default=0.0, help="probability of waiting --slow-s first")
    p.add_argument("--slow-s", type=float, default=2.0, help="seconds a slow response waits")
    p.add_argument("--status", type=int, default=503, help="status of an injected error")
    p.add_argument("--min-cut", type=int, default=1, help="smallest byte offset of a cut")
    p.add_argument("--max-cut", type=int, default=300_000, help="largest byte offset of a cut")
    p.add_argument("--only", default="", help="inject faults only into paths containing this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats", required=True, help="JSON file of outcome counts")
    return p.parse_args()


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    host, port = args.upstream.rsplit(":", 1)
    counts = {"requests": 0, "error": 0, "drop": 0, "slow": 0, "ok": 0}

    def record(outcome: str) -> None:
        counts[outcome] += 1
        tmp = f"{args.stats}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(counts, f)
        os.replace(tmp, args.stats)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else ""
        length = 0
        kept = [lines[0]]
        for line in lines[1:]:
            if not line:
                continue
            name = line.split(":", 1)[0].strip().lower()
            if name == "content-length":
                length = int(line.split(":", 1)[1])
            if name in ("connection", "keep-alive", "proxy-connection"):
                continue
            kept.append(line)
        body = await reader.readexactly(length) if length else b""
        request = ("\r\n".join(kept) + "\r\nConnection: close\r\n\r\n").encode("latin-1") + body
        counts["requests"] += 1
        faulty = args.only in path
        draw = rng.random()
        outcome = "ok"
        if faulty and draw < args.error:
            outcome = "error"
        elif faulty and draw < args.error + args.drop:
            outcome = "drop"
        elif faulty and draw < args.error + args.drop + args.slow:
            outcome = "slow"
        record(outcome)
        if outcome == "error":
            writer.write(f"HTTP/1.1 {args.status} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            writer.close()
            return
        if outcome == "slow":
            await asyncio.sleep(args.slow_s)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            writer.close()
            return
        up_writer.write(request)
        await up_writer.drain()
        budget = rng.randint(args.min_cut, args.max_cut) if outcome == "drop" else None
        try:
            while True:
                chunk = await up_reader.read(65536)
                if not chunk:
                    break
                if budget is not None:
                    if len(chunk) >= budget:
                        writer.write(chunk[:budget])
                        await writer.drain()
                        break
                    budget -= len(chunk)
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            up_writer.close()
            if budget is not None:
                writer.transport.abort()  # a reset, not a clean close
            else:
                writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(parse()))
