"""`pipeline.serve.client.post` against a real HTTP server on loopback that closes connections
with no answer, as HAProxy does with a request it held for a replica that died."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator

import pytest

from pipeline.serve.client import ServeError, post


@pytest.fixture
def server() -> Iterator[tuple[str, dict]]:
    """A server that closes the first `state["drop"]` connections without answering, then answers
    200 with the body's length; `state["asked"]` counts the requests it read."""
    state = {"drop": 0, "asked": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state["asked"] += 1
            if state["asked"] <= state["drop"]:
                self.close_connection = True
                return  # nothing written: the client sees the connection closed with no answer
            answer = json.dumps({"bytes": len(body)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/predict", state
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_connection_closed_with_no_answer_is_asked_once_more(server) -> None:
    url, state = server
    state["drop"] = 1
    assert post(url, b"x" * 100, "image/jpeg") == (200, {"bytes": 100})
    assert state["asked"] == 2


def test_a_second_close_with_no_answer_is_an_error_naming_the_url(server) -> None:
    url, state = server
    state["drop"] = 2
    with pytest.raises(ServeError, match=f"no answer from {url}: the connection closed twice"):
        post(url, b"x", "image/jpeg")
    assert state["asked"] == 2
