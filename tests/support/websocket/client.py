"""WebSocket clients for tests/websocket.rs, on the `websockets` library. Each mode prints one
JSON document on stdout. Usage: client.py MODE URL [ARGS]

  echo URL CLIENTS MESSAGES   CLIENTS connections at once, each sending MESSAGES texts and
                              reading each answer: {"answers": [[answer, ...], ...]}
  long URL ROUNDS GAP_S       one connection, one message every GAP_S seconds for ROUNDS
                              rounds: {"answers": [...]}
  many URL N                  one connection, N messages one after the other, each answer
                              checked: {"answered": N, "seconds": ...}
  close URL                   sends one message, then closes (code 1000): {"answer": ...}
  bye URL                     sends "bye" and waits for the instance's close:
                              {"code": ..., "reason": ...}
  status URL                  expects the handshake to be refused: {"status": ...}
"""

import asyncio
import json
import sys

import websockets

# Every step is bounded: a test never waits on a stuck connection for long.
STEP = 10


def connect(url):
    # No keep-alive pings: the proxy must carry the connection as it is.
    return websockets.connect(url, ping_interval=None, open_timeout=STEP, close_timeout=STEP)


async def exchange(ws, text):
    await asyncio.wait_for(ws.send(text), STEP)
    return await asyncio.wait_for(ws.recv(), STEP)


async def echo(url, clients, messages):
    async def one(i):
        async with connect(url) as ws:
            return [await exchange(ws, f"c{i}m{j}") for j in range(messages)]

    return {"answers": await asyncio.gather(*(one(i) for i in range(clients)))}


async def long(url, rounds, gap):
    out = []
    async with connect(url) as ws:
        for j in range(rounds):
            out.append(await exchange(ws, f"long{j}"))
            await asyncio.sleep(gap)
    return {"answers": out}


async def many(url, n):
    loop = asyncio.get_running_loop()
    answered = 0
    async with connect(url) as ws:
        started = loop.time()
        for j in range(n):
            answer = await exchange(ws, f"m{j}")
            if answer.split(":", 1)[1] != f"m{j}":
                raise SystemExit(f"message {j} answered {answer!r}")
            answered += 1
        seconds = loop.time() - started
    return {"answered": answered, "seconds": seconds}


async def close(url):
    ws = await connect(url)
    answer = await exchange(ws, "before-close")
    await asyncio.wait_for(ws.close(code=1000), STEP)
    return {"answer": answer}


async def bye(url):
    async with connect(url) as ws:
        await asyncio.wait_for(ws.send("bye"), STEP)
        try:
            await asyncio.wait_for(ws.recv(), STEP)
        except websockets.ConnectionClosed:
            pass
        await asyncio.wait_for(ws.wait_closed(), STEP)
        return {"code": ws.close_code, "reason": ws.close_reason}


async def status(url):
    try:
        async with connect(url):
            return {"status": 101}
    except websockets.InvalidStatusCode as e:
        return {"status": e.status_code}


async def main():
    mode, url, *args = sys.argv[1:]
    if mode == "echo":
        r = await echo(url, int(args[0]), int(args[1]))
    elif mode == "long":
        r = await long(url, int(args[0]), float(args[1]))
    elif mode == "many":
        r = await many(url, int(args[0]))
    elif mode == "close":
        r = await close(url)
    elif mode == "bye":
        r = await bye(url)
    elif mode == "status":
        r = await status(url)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print(json.dumps(r), flush=True)


asyncio.run(main())
