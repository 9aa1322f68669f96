"""Talking to a running deployment over HTTP: `resnet-pipe predict`, the tests and the benchmark.

answer = predict_file("http://127.0.0.1:8000", Path("cat.jpg"))   # {"model", "version", "predictions"}
"""

from __future__ import annotations

import json
import mimetypes
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

TOKEN_ENV = "RESNET_PIPE_SERVE_TOKEN"  # set: requests need "Authorization: Bearer <token>"


class ServeError(RuntimeError):
    """The server answered with an error (its JSON message), or could not be reached."""


def post(url: str, body: bytes, content_type: str, timeout_s: float = 60.0) -> tuple[int, dict]:
    """POSTs `body`; returns the status and the JSON answer (errors included). A connection closed
    with no answer is asked once more: every route of the app is an inference or a read."""
    headers = {"Content-Type": content_type}
    token = os.environ.get(TOKEN_ENV)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    for attempt in (1, 2):
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, {"error": text.decode(errors="replace") or e.reason}
        except ConnectionResetError:
            # closed with no answer: the replica holding it died, and HAProxy did not send it to
            # another (docs/reliability.md); an inference asked again is answered the same
            if attempt == 2:
                raise ServeError(f"no answer from {url}: the connection closed twice") from None
        except OSError as e:
            raise ServeError(f"no answer from {url}: {e} (is `resnet-pipe deploy` running?)") from None


def predict_file(url: str, path: Path) -> dict:
    """One image file's answer from the server at `url`.

    Raises:
        ServeError: the server refused it (with its message) or is not there.
    """
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    status, answer = post(f"{url.rstrip('/')}/predict", path.read_bytes(), content_type)
    if status != 200:
        raise ServeError(f"{status}: {answer.get('error', answer)}")
    return answer


def wait_until_up(
    url: str, process: subprocess.Popen, log: Callable[[], str], timeout_s: float = 180
) -> None:
    """Waits until GET `url` answers 200 (a server `process` starting up).

    Raises:
        RuntimeError: the process ended or `timeout_s` passed first; with the end of its `log()`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            ended = f"exited with {process.returncode}" if process.poll() is not None else "no answer"
            raise RuntimeError(f"the server for {url} did not start ({ended}): {log()[-2000:]}")
        time.sleep(0.5)
