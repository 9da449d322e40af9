"""WebSocket echo upstream for the Autobahn run (scripts/autobahn.sh).

Tether's proxy route /echo relays the Autobahn fuzzing client to this server,
which sends every message back as it came (text as text, binary as binary).
It listens on 127.0.0.1 only, on a free port chosen by the kernel, and prints
`PORT <n>` on its first stdout line once it is accepting connections. It stops
by itself after --max-seconds so that a forgotten one cannot linger.

Needs Python 3 with websockets (the .venv that scripts/test.sh sets up).
"""

import argparse
import asyncio
import sys

from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed


async def echo(ws):
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


async def main(max_seconds: float) -> None:
    async with serve(
        echo,
        "127.0.0.1",
        0,
        compression=None,  # Tether negotiates no permessage-deflate anyway
        max_size=16 * 1024 * 1024,  # never the limit: Tether's max_message_bytes is
        ping_interval=None,  # no pings of our own in the middle of a test case
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"PORT {port}", flush=True)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().create_future(), max_seconds)
        except asyncio.TimeoutError:
            print(f"echo_server: stopping after {max_seconds:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args()
    asyncio.run(main(args.max_seconds))
