"""A WebSocket instance for tests/websocket.rs, on aiohttp (a real server, keep-alive HTTP/1.1
and WebSocket on one port). Usage: instance.py NAME PORT

  GET /ws          WebSocket: each text message comes back as "NAME:message"; "bye" makes
                   the instance close with code 4001; when the client ends the connection, a
                   line "closed CODE" is printed (flushed) for the test to see.
  GET /forbidden   403 with the body "forbidden by NAME\n".
  anything else    200 with the body NAME; headers x-backend: NAME and x-peer: the address
                   the request came from (fluxd's side of its instance connection).
"""

import sys

from aiohttp import WSMsgType, web

NAME = sys.argv[1]
PORT = int(sys.argv[2])


async def ws(request):
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        if msg.type != WSMsgType.TEXT:
            continue
        if msg.data == "bye":
            await sock.close(code=4001, message=b"bye from " + NAME.encode())
            break
        await sock.send_str(f"{NAME}:{msg.data}")
    print(f"closed {sock.close_code}", flush=True)
    return sock


def headers(request):
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return {"x-backend": NAME, "x-peer": f"{peer[0]}:{peer[1]}" if peer else ""}


async def forbidden(request):
    return web.Response(status=403, text=f"forbidden by {NAME}\n", headers=headers(request))


async def plain(request):
    return web.Response(text=NAME, headers=headers(request))


app = web.Application()
app.add_routes(
    [web.get("/ws", ws), web.get("/forbidden", forbidden), web.route("*", "/{tail:.*}", plain)]
)
print("ready", flush=True)
web.run_app(app, host="127.0.0.1", port=PORT, print=None, handle_signals=True)
