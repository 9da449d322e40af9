"""Interop tests: the real `tether serve` binary, driven over real loopback sockets
by the PyPI `websockets` client, `requests` and a minimal raw RFC 6455 client (for
what `websockets` will not do, such as ignoring server pings).

SPEC sections covered: 2 (admission, refusals), 4 (heartbeat, closing), 5 (the
WebSocket protocol), 8 (the server API: disconnect, stats, clients).

Every test ends with the server holding nothing: an autouse fixture polls
GET /api/stats until connections ws=sse=proxy=0, clients=0, tasks=0.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import time
import uuid

import pytest
import requests
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import Server, start_server, stop_server, wait_idle

# The module's server configuration: small heartbeat so its tests take ~1 s, a
# per-client limit of 1 for the client_limit refusal, and a small message limit.
HEARTBEAT_MS = 400
HEARTBEAT_TIMEOUT_MS = 400
MAX_MESSAGE_BYTES = 1024
MAX_INBOUND_PER_SEC = 50  # the default, stated so the rate test knows it
SERVER_ENV = {
    "TETHER_HEARTBEAT__INTERVAL_MS": str(HEARTBEAT_MS),
    "TETHER_HEARTBEAT__TIMEOUT_MS": str(HEARTBEAT_TIMEOUT_MS),
    "TETHER_CLIENTS__MAX_CONNECTIONS_PER_CLIENT": "1",
    "TETHER_LIMITS__MAX_MESSAGE_BYTES": str(MAX_MESSAGE_BYTES),
    "TETHER_LIMITS__MAX_INBOUND_PER_SEC": str(MAX_INBOUND_PER_SEC),
    "TETHER_SHUTDOWN__PRE_DRAIN_MS": "0",
    "TETHER_LOG__LEVEL": "debug",
}
NODE_ID = "pynode"

# Longest wait for any one frame the server owes us.
RECV_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tether_bin, tmp_path_factory) -> Server:
    srv = start_server(tether_bin, SERVER_ENV, tmp_path_factory.mktemp("tether"), node_id=NODE_ID)
    try:
        yield srv
    finally:
        stop_server(srv)


@pytest.fixture(autouse=True)
def idle_around_each_test(server):
    """Each test starts and must end with a server that holds nothing."""
    wait_idle(server)
    yield
    server.assert_alive()
    wait_idle(server)


def unique_client(prefix: str = "py") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def run(coro):
    return asyncio.run(coro)


def ws_connect(server: Server, query: str = "", **kw):
    # No client-side pings: the server's heartbeat is under test, and our own pings
    # would count towards the inbound frame rate.
    kw.setdefault("ping_interval", None)
    kw.setdefault("open_timeout", RECV_TIMEOUT_S)
    kw.setdefault("close_timeout", RECV_TIMEOUT_S)
    return connect(server.ws_url(query), **kw)


async def recv_json(ws) -> dict:
    raw = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
    assert isinstance(raw, str), f"expected a text frame, got {type(raw).__name__}: {raw!r}"
    frame = json.loads(raw)
    assert isinstance(frame, dict), frame
    return frame


async def recv_welcome(ws) -> dict:
    frame = await recv_json(ws)
    assert frame.get("type") == "welcome", f"first frame is not welcome: {frame}"
    return frame


async def recv_until_closed(ws) -> tuple[list[dict], ConnectionClosed]:
    """Reads text frames until the server closes; returns them and the close."""
    frames: list[dict] = []
    deadline = time.monotonic() + RECV_TIMEOUT_S
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"server did not close within {RECV_TIMEOUT_S}s; frames so far: {frames}"
        try:
            raw = await asyncio.wait_for(ws.recv(), left)
        except ConnectionClosed as closed:
            return frames, closed
        except TimeoutError:
            raise AssertionError(f"server did not close within {RECV_TIMEOUT_S}s; frames so far: {frames}") from None
        assert isinstance(raw, str), f"unexpected binary frame {raw!r}"
        frames.append(json.loads(raw))


async def assert_ping_pong(ws, ref: int) -> None:
    await ws.send(json.dumps({"type": "ping", "ref": ref}))
    assert await recv_json(ws) == {"type": "pong", "ref": ref}


def close_code(closed: ConnectionClosed) -> int | None:
    """The close code the server sent (None if it sent no close frame)."""
    return closed.rcvd.code if closed.rcvd is not None else None


# ---------------------------------------------------------------------------
# A minimal raw WebSocket client (RFC 6455), for behaviour `websockets` hides:
# it never answers server pings unless told to, and sees every control frame.
# ---------------------------------------------------------------------------

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


class RawWs:
    def __init__(self, server: Server, query: str):
        host, port = server.client_addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=RECV_TIMEOUT_S)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws?{query} HTTP/1.1\r\n"
            f"Host: {server.client_addr}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        )
        self.sock.sendall(request.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            assert chunk, "server closed during the handshake"
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line = head.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/1.1 101"), f"handshake answered {head!r}"

    def _read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed by the server")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_frame(self, timeout_s: float = RECV_TIMEOUT_S) -> tuple[int, bytes]:
        """One whole frame: (opcode, payload). Fragmented messages are not expected."""
        self.sock.settimeout(timeout_s)
        b0, b1 = self._read_exact(2)
        assert b0 & 0x80, "fragmented frame from the server"
        assert not b1 & 0x80, "server frames must not be masked"
        length = b1 & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", self._read_exact(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", self._read_exact(8))
        return b0 & 0x0F, self._read_exact(length)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        header = bytes([0x80 | opcode])
        n = len(payload)
        if n < 126:
            header += bytes([0x80 | n])
        elif n < 65536:
            header += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            header += bytes([0x80 | 127]) + struct.pack("!Q", n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send_json(self, obj) -> None:
        self.send_frame(OP_TEXT, json.dumps(obj).encode())

    def close(self) -> None:
        self.sock.close()


def parse_close(payload: bytes) -> tuple[int | None, str]:
    if len(payload) < 2:
        return None, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


# ---------------------------------------------------------------------------
# Section 5: welcome, ping/pong, errors that keep the connection open
# ---------------------------------------------------------------------------


def test_welcome_frame_names_connection_client_and_node(server):
    async def go():
        async with ws_connect(server, "client=py1") as ws:
            welcome = await recv_welcome(ws)
            assert set(welcome) == {
                "type", "conn_id", "client_id", "node_id", "heartbeat_ms", "heartbeat_timeout_ms"
            }, welcome
            assert welcome["client_id"] == "py1"
            assert welcome["node_id"] == NODE_ID
            assert welcome["heartbeat_ms"] == HEARTBEAT_MS
            assert welcome["heartbeat_timeout_ms"] == HEARTBEAT_TIMEOUT_MS
            # conn_id = <node_id>-<boot id>-<n>
            conn_id = welcome["conn_id"]
            assert isinstance(conn_id, str) and conn_id.startswith(NODE_ID + "-"), conn_id
            boot, n = conn_id[len(NODE_ID) + 1 :].rsplit("-", 1)
            assert boot and n.isdigit(), conn_id

            # The registry agrees with what the client was told.
            stats = server.stats()
            assert stats["connections"]["ws"] == 1 and stats["clients"] == 1, stats
            r = server.api_get("/api/clients/py1")
            assert r.status_code == 200, r.text
            client = r.json()
            assert client["client_id"] == "py1" and client["state"] == "online", client
            assert [c["conn_id"] for c in client["connections"]] == [conn_id], client
            assert client["connections"][0]["transport"] == "ws", client
            return conn_id

    first = run(go())
    # After the close the client is gone, and a new connection gets a new conn_id.
    wait_idle(server)
    assert server.api_get("/api/clients/py1").status_code == 404

    async def again():
        async with ws_connect(server, "client=py1") as ws:
            return (await recv_welcome(ws))["conn_id"]

    assert run(again()) != first


def test_anonymous_client_gets_generated_id(server):
    async def go():
        async with ws_connect(server) as ws:
            welcome = await recv_welcome(ws)
            assert welcome["client_id"].startswith("anon-"), welcome

    run(go())


def test_ping_gets_pong_with_ref(server):
    async def go():
        async with ws_connect(server, f"client={unique_client()}") as ws:
            await recv_welcome(ws)
            await ws.send(json.dumps({"type": "ping", "ref": 7}))
            assert await recv_json(ws) == {"type": "pong", "ref": 7}
            # Without a ref the reply still has the field, as null.
            await ws.send(json.dumps({"type": "ping"}))
            assert await recv_json(ws) == {"type": "pong", "ref": None}

    run(go())


def assert_error_frame(frame: dict, ref=None) -> None:
    assert frame.get("type") == "error", frame
    assert set(frame) == {"type", "ref", "code", "message"}, frame
    assert frame["ref"] == ref, frame
    assert isinstance(frame["code"], str) and frame["code"], frame
    assert isinstance(frame["message"], str) and frame["message"], frame


def test_malformed_json_gets_error_and_connection_stays_open(server):
    async def go():
        async with ws_connect(server, f"client={unique_client()}") as ws:
            await recv_welcome(ws)
            await ws.send("{this is not json")
            assert_error_frame(await recv_json(ws))
            await assert_ping_pong(ws, 8)
            # Valid JSON that is not a frame object.
            await ws.send("[1, 2, 3]")
            assert_error_frame(await recv_json(ws))
            await assert_ping_pong(ws, 9)

    run(go())


def test_unknown_type_gets_error_with_ref_and_connection_stays_open(server):
    async def go():
        async with ws_connect(server, f"client={unique_client()}") as ws:
            await recv_welcome(ws)
            await ws.send(json.dumps({"type": "frobnicate", "ref": 11}))
            frame = await recv_json(ws)
            assert_error_frame(frame, ref=11)
            await assert_ping_pong(ws, 12)

    run(go())


def test_binary_frame_gets_error_and_connection_stays_open(server):
    async def go():
        async with ws_connect(server, f"client={unique_client()}") as ws:
            await recv_welcome(ws)
            await ws.send(b"\x00\x01binary")
            assert_error_frame(await recv_json(ws))
            await assert_ping_pong(ws, 13)

    run(go())


def test_subprotocol_tether_v1_is_echoed(server):
    async def go():
        async with ws_connect(server, f"client={unique_client()}", subprotocols=["tether.v1"]) as ws:
            assert ws.subprotocol == "tether.v1"
            await recv_welcome(ws)
        async with ws_connect(server, f"client={unique_client()}", subprotocols=["x.other", "tether.v1"]) as ws:
            assert ws.subprotocol == "tether.v1"
            await recv_welcome(ws)
        # Not offered: none chosen (the connection still works).
        async with ws_connect(server, f"client={unique_client()}") as ws:
            assert ws.subprotocol is None
            await recv_welcome(ws)

    run(go())


# ---------------------------------------------------------------------------
# Limits on inbound frames (section 5)
# ---------------------------------------------------------------------------


def test_message_over_max_message_bytes_closes_1009(server):
    async def go():
        async with ws_connect(server, f"client={unique_client()}") as ws:
            await recv_welcome(ws)
            # Just under the limit: processed (an error reply: unknown field), still open.
            under = json.dumps({"type": "ping", "ref": 1, "pad": ""})
            under = json.dumps({"type": "ping", "ref": 1, "pad": "x" * (MAX_MESSAGE_BYTES - len(under))})
            assert len(under.encode()) == MAX_MESSAGE_BYTES
            await ws.send(under)
            assert_error_frame(await recv_json(ws), ref=1)
            await assert_ping_pong(ws, 2)

            over = json.dumps({"type": "ping", "ref": 3, "pad": "x" * (2 * MAX_MESSAGE_BYTES)})
            await ws.send(over)
            frames, closed = await recv_until_closed(ws)
            assert close_code(closed) == 1009, f"close {closed!r}, frames {frames}"
            # The closing announcement is best-effort for 1009; if sent, it says 1009.
            for f in frames:
                assert f == {**f, "type": "closing", "code": 1009, "reconnect": False}, frames

    run(go())


def test_too_many_frames_per_second_closes_4029(server):
    sent = 3 * MAX_INBOUND_PER_SEC

    async def go():
        async with ws_connect(server, f"client={unique_client()}") as ws:
            await recv_welcome(ws)
            for i in range(sent):
                await ws.send(json.dumps({"type": "ping", "ref": i}))
            frames, closed = await recv_until_closed(ws)
            assert close_code(closed) == 4029, f"close {closed!r}"
            pongs = [f for f in frames if f.get("type") == "pong"]
            closings = [f for f in frames if f.get("type") == "closing"]
            # The frames within the allowance were answered, in order. (The server's
            # heartbeat pongs from the library count towards the rate too, and a
            # one-second window may roll over mid-burst, so the count is a range.)
            assert [f["ref"] for f in pongs] == list(range(len(pongs))), frames
            assert MAX_INBOUND_PER_SEC - 5 <= len(pongs) < sent, len(pongs)
            assert len(closings) == 1, frames
            assert closings[0]["code"] == 4029 and closings[0]["reconnect"] is True, closings
            assert frames[-1] is closings[0], "closing must be the last frame before the close"

    run(go())


# ---------------------------------------------------------------------------
# Server API disconnect (sections 4 and 8)
# ---------------------------------------------------------------------------


def test_api_disconnect_sends_closing_then_close_4002(server):
    async def go():
        async with ws_connect(server, "client=py1") as ws:
            await recv_welcome(ws)
            r = await asyncio.to_thread(
                server.api_post_json, "/api/disconnect", {"client_id": "py1", "reconnect": True}
            )
            assert r.status_code == 200, r.text
            assert r.json() == {"closed": 1}
            frames, closed = await recv_until_closed(ws)
            assert len(frames) == 1, frames
            closing = frames[0]
            assert set(closing) == {"type", "code", "reason", "reconnect", "retry_ms"}, closing
            assert closing["type"] == "closing" and closing["code"] == 4002, closing
            assert closing["reconnect"] is True, closing
            assert isinstance(closing["reason"], str), closing
            assert close_code(closed) == 4002, repr(closed)
            assert closed.rcvd.reason == closing["reason"], (closed.rcvd, closing)

    run(go())


def test_api_disconnect_defaults_and_custom_code(server):
    cid = unique_client()

    async def go():
        async with ws_connect(server, f"client={cid}") as ws:
            welcome = await recv_welcome(ws)
            body = {"conn_id": welcome["conn_id"], "code": 4100, "reason": "bye now"}
            r = await asyncio.to_thread(server.api_post_json, "/api/disconnect", body)
            assert r.status_code == 200 and r.json() == {"closed": 1}, r.text
            frames, closed = await recv_until_closed(ws)
            assert frames == [
                {"type": "closing", "code": 4100, "reason": "bye now", "reconnect": False, "retry_ms": None}
            ], frames
            assert close_code(closed) == 4100 and closed.rcvd.reason == "bye now", repr(closed)

    run(go())


def test_api_disconnect_rejects_bad_requests(server):
    cid = unique_client()

    async def go():
        async with ws_connect(server, f"client={cid}") as ws:
            await recv_welcome(ws)
            # No selector: 400, nothing closed.
            r = await asyncio.to_thread(server.api_post_json, "/api/disconnect", {"reconnect": True})
            assert r.status_code == 400 and r.json()["error"], r.text
            # Not application/json: refused (no cross-site form posts), nothing closed.
            r = await asyncio.to_thread(
                server.http.post,
                server.api_base + "/api/disconnect",
                data=json.dumps({"client_id": cid}),
                headers={"Content-Type": "text/plain"},
                timeout=5,
            )
            assert r.status_code == 415, r.text
            # A Host that is not loopback: refused (no DNS rebinding).
            r = await asyncio.to_thread(
                server.http.post,
                server.api_base + "/api/disconnect",
                json={"client_id": cid},
                headers={"Host": "evil.example"},
                timeout=5,
            )
            assert r.status_code == 403, r.text
            # Unknown client: nothing to close.
            r = await asyncio.to_thread(server.api_post_json, "/api/disconnect", {"client_id": "nobody-here"})
            assert r.status_code == 200 and r.json() == {"closed": 0}, r.text
            # The connection survived all of that.
            await assert_ping_pong(ws, 1)

    run(go())


# ---------------------------------------------------------------------------
# Admission refusals (section 2)
# ---------------------------------------------------------------------------


def test_client_limit_refusal_close_form(server):
    cid = unique_client("x")

    async def go():
        async with ws_connect(server, f"client={cid}") as first:
            await recv_welcome(first)
            # The refused handshake is still upgraded ...
            async with ws_connect(server, f"client={cid}&refusal=close") as second:
                # ... its first and only frame is the closing announcement ...
                frames, closed = await recv_until_closed(second)
                assert len(frames) == 1, frames
                closing = frames[0]
                assert closing["type"] == "closing", closing
                assert closing["code"] == 4409, closing
                assert closing["error"] == "client_limit", closing
                assert isinstance(closing["message"], str) and closing["message"], closing
                assert closing["reconnect"] is False, closing
                assert "retry_ms" in closing, closing
                # ... then the close frame with the refusal's code.
                assert close_code(closed) == 4409, repr(closed)
            # The refusal left no state: still one connection, and the first works.
            stats = server.stats()
            assert stats["connections"]["ws"] == 1 and stats["clients"] == 1, stats
            await assert_ping_pong(first, 1)
        # Once the first has gone, the client is admitted again.
        await asyncio.sleep(0)
        await asyncio.to_thread(wait_idle, server)
        async with ws_connect(server, f"client={cid}") as again:
            assert (await recv_welcome(again))["client_id"] == cid

    run(go())


def test_client_limit_refusal_http_409(server):
    cid = unique_client("x")

    async def go():
        async with ws_connect(server, f"client={cid}") as first:
            await recv_welcome(first)
            with pytest.raises(InvalidStatus) as info:
                async with ws_connect(server, f"client={cid}"):
                    pass
            response = info.value.response
            assert response.status_code == 409, response
            body = json.loads(response.body)
            assert body["error"] == "client_limit", body
            assert isinstance(body["message"], str) and body["message"], body
            stats = server.stats()
            assert stats["connections"]["ws"] == 1 and stats["clients"] == 1, stats
            await assert_ping_pong(first, 1)

    run(go())


def test_plain_get_on_ws_is_426(server):
    r = requests.get(server.client_base + "/ws", timeout=5)
    assert r.status_code == 426, r.text
    assert r.json()["error"], r.text


# ---------------------------------------------------------------------------
# Heartbeat (section 4)
# ---------------------------------------------------------------------------


def test_server_pings_and_silent_peer_is_closed_4000(server):
    """A peer that never answers (no pong, no frame) is closed with 4000 after one
    interval + timeout, announced by a closing frame."""
    ws = RawWs(server, f"client={unique_client()}")
    try:
        op, payload = ws.read_frame()
        assert op == OP_TEXT and json.loads(payload)["type"] == "welcome", (op, payload)
        start = time.monotonic()
        seen_ping = False
        texts = []
        while True:
            op, payload = ws.read_frame(timeout_s=RECV_TIMEOUT_S)
            if op == OP_PING:
                seen_ping = True
            elif op == OP_TEXT:
                texts.append(json.loads(payload))
            elif op == OP_CLOSE:
                code, reason = parse_close(payload)
                break
            else:
                raise AssertionError(f"unexpected opcode {op}")
        elapsed = time.monotonic() - start
        assert seen_ping, "the server never pinged"
        assert code == 4000, (code, reason)
        assert all(t["type"] == "closing" and t["code"] == 4000 for t in texts), texts
        # Not before interval + timeout; well before several intervals.
        budget = (HEARTBEAT_MS + HEARTBEAT_TIMEOUT_MS) / 1000
        assert budget * 0.9 <= elapsed <= budget + 2.0, elapsed
        ws.send_frame(OP_CLOSE, payload[:2])
    finally:
        ws.close()


def test_app_level_ping_keeps_connection_alive_without_ws_pongs(server):
    """{"type":"ping"} counts for the heartbeat: a peer that never answers the server's
    WebSocket pings but sends app pings stays open well past interval + timeout."""
    ws = RawWs(server, f"client={unique_client()}")
    try:
        op, payload = ws.read_frame()
        assert op == OP_TEXT and json.loads(payload)["type"] == "welcome"
        budget = (HEARTBEAT_MS + HEARTBEAT_TIMEOUT_MS) / 1000
        end = time.monotonic() + 3 * budget
        pings = pongs = 0
        ref = 0
        while time.monotonic() < end:
            ref += 1
            ws.send_json({"type": "ping", "ref": ref})
            # Read until our pong arrives; server WebSocket pings go unanswered.
            while True:
                op, payload = ws.read_frame()
                assert op != OP_CLOSE, f"closed despite app pings: {parse_close(payload)}"
                if op == OP_PING:
                    pings += 1
                elif op == OP_TEXT:
                    frame = json.loads(payload)
                    assert frame == {"type": "pong", "ref": ref}, frame
                    pongs += 1
                    break
            time.sleep(HEARTBEAT_MS / 4000)
        assert pings >= 2, f"expected the server to keep pinging, saw {pings}"
        assert pongs == ref
        # A clean close from our side is echoed.
        ws.send_frame(OP_CLOSE, struct.pack("!H", 1000))
        while True:
            op, payload = ws.read_frame()
            if op == OP_CLOSE:
                assert parse_close(payload)[0] == 1000, payload
                break
    finally:
        ws.close()


def test_websockets_client_answering_pings_stays_open(server):
    async def go():
        async with ws_connect(server, f"client={unique_client()}") as ws:
            await recv_welcome(ws)
            # Several heartbeat rounds; the library answers the server's pings.
            await asyncio.sleep(4 * (HEARTBEAT_MS + HEARTBEAT_TIMEOUT_MS) / 1000)
            await assert_ping_pong(ws, 1)

    run(go())


# ---------------------------------------------------------------------------
# Release on every way out
# ---------------------------------------------------------------------------


def test_abrupt_tcp_close_releases_the_connection(server):
    ws = RawWs(server, f"client={unique_client()}")
    op, payload = ws.read_frame()
    assert op == OP_TEXT and json.loads(payload)["type"] == "welcome"
    assert server.stats()["connections"]["ws"] == 1
    # No close frame: just drop the TCP connection. The autouse fixture then
    # checks that the registry, client and task are released.
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    ws.close()


def test_many_connections_all_released(server):
    async def go():
        conns = [await ws_connect(server, f"client={unique_client()}") for _ in range(20)]
        try:
            for c in conns:
                await recv_welcome(c)
            stats = server.stats()
            assert stats["connections"]["ws"] == 20 and stats["clients"] == 20, stats
        finally:
            await asyncio.gather(*(c.close() for c in conns))

    run(go())


# ---------------------------------------------------------------------------
# Drain on SIGTERM (section 4), on a server of its own
# ---------------------------------------------------------------------------


def test_sigterm_drains_with_closing_1001_and_exits_0(tether_bin, tmp_path):
    pre_drain_ms, window_ms = 800, 1500
    env = {
        **SERVER_ENV,
        "TETHER_SHUTDOWN__PRE_DRAIN_MS": str(pre_drain_ms),
        "TETHER_SHUTDOWN__DRAIN_WINDOW_MS": str(window_ms),
        "TETHER_SHUTDOWN__TIMEOUT_MS": "10000",
    }
    srv = start_server(tether_bin, env, tmp_path, node_id="drainnode")

    async def go():
        a = await ws_connect(srv, "client=drain-a")
        b = await ws_connect(srv, "client=drain-b")
        await recv_welcome(a)
        await recv_welcome(b)
        assert requests.get(srv.client_base + "/readyz", timeout=5).status_code == 200
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        # /readyz turns 503 at once, while handshakes are still admitted (pre-drain).
        await asyncio.sleep(0.1)
        r = await asyncio.to_thread(requests.get, srv.client_base + "/readyz", timeout=5)
        assert r.status_code == 503, r.text
        c = await ws_connect(srv, "client=drain-c")
        await recv_welcome(c)
        assert time.monotonic() - t0 < pre_drain_ms / 1000, "the pre-drain check came too late"

        # Each connection is announced 1001 with reconnect and a retry_ms, then closed 1001,
        # the closes spread over the drain window.
        async def closed_at(ws):
            frames, closed = await recv_until_closed(ws)
            return frames, closed, time.monotonic() - t0

        results = await asyncio.gather(*(closed_at(ws) for ws in (a, b, c)))
        times = sorted(t for _, _, t in results)
        assert times[0] >= pre_drain_ms / 1000 * 0.9, times
        # Three connections at 0, 1/3 and 2/3 of the window.
        assert times[-1] - times[0] >= (window_ms / 1000) * (2 / 3) * 0.8, times
        for frames, closed, _ in results:
            assert len(frames) == 1, frames
            closing = frames[0]
            assert closing["type"] == "closing" and closing["code"] == 1001, closing
            assert closing["reconnect"] is True, closing
            assert isinstance(closing["retry_ms"], int) and closing["retry_ms"] >= 0, closing
            assert close_code(closed) == 1001, repr(closed)

    async def refused_while_draining():
        # Between the spread closes the node refuses new handshakes with `draining`.
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(srv, "client=drain-d"):
                pass
        response = info.value.response
        assert response.status_code == 503, response
        assert json.loads(response.body)["error"] == "draining", response.body
        assert int(response.headers["Retry-After"]) >= 1, response.headers

    try:
        async def both():
            task = asyncio.create_task(go())
            # Well into the drain window (after pre-drain, before the last close).
            await asyncio.sleep((pre_drain_ms + window_ms / 3) / 1000 + 0.1)
            if task.done():
                await task  # surfaces its own failure, if it failed
                pytest.fail("every connection closed before the middle of the drain window")
            await refused_while_draining()
            await task

        run(both())
        # The process exits 0 once every connection is closed.
        assert srv.proc.wait(timeout=10) == 0, srv.log_tail()
    finally:
        stop_server(srv)
