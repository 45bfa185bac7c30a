"""A local OpenAI-compatible chat-completions server on 127.0.0.1 for tests (no network)."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        self.server.headers.append(dict(self.headers))
        path = self.path.split("?", 1)[0]  # a query (e.g. a key) is not part of the route
        if path != "/v1/chat/completions" or self.server.fail_next:
            self.server.fail_next = max(0, self.server.fail_next - 1)
            self.send_response(503 if path == "/v1/chat/completions" else 404)
            self.end_headers()
            return
        content = self.server.reply(body["messages"][-1]["content"])
        reply = {"id": "x", "object": "chat.completion", "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": self.server.finish_reason, "message": {"role": "assistant", "content": content}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextmanager
def fake_llm_server(reply: Callable[[str], str]) -> Iterator[ThreadingHTTPServer]:
    """Serve `reply(last user message)`; `.requests` records bodies (`.headers` their HTTP headers),
    `.fail_next = n` answers 503 n times,
    `.finish_reason` is what every reply says (default "stop"; "length": cut at max_tokens)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests, httpd.headers, httpd.fail_next, httpd.reply, httpd.finish_reason = [], [], 0, reply, "stop"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def base_url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"
