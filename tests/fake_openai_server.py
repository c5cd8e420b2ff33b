"""A stand-in OpenAI-compatible streaming server for the serving tests (stdlib only, no model).

It behaves like llama-server where the load client can tell: /health answers 503 while "loading" and
200 after; /v1/completions streams one SSE chunk per token (text = the token's index in hex), then a
final chunk with usage, then [DONE]; `--slots` requests decode at once, the rest wait (so a rate above
slots / (ttft + n x tpot) saturates it). --die-after N exits the process when request N+1 arrives.

As vLLM with a real tokenizer (--vllm): a request with return_token_ids gets each chunk's token_ids, and
every other token streams with an empty text (a byte-level piece held back by the detokenizer).
--child-pid-file F starts a child process in the server's process group (as vLLM's engine core) and
writes its pid to F.

usage: python fake_openai_server.py --port P [--ttft 0.02] [--tpot 0.005] [--slots 2] [--load-s 0.3]
       [--model-name fake-model] [--vllm] [--child-pid-file F]
"""
import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ttft", type=float, default=0.02)
    ap.add_argument("--tpot", type=float, default=0.005)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--load-s", type=float, default=0.3)
    ap.add_argument("--die-after", type=int, default=0)
    ap.add_argument("--no-usage", action="store_true")
    ap.add_argument("--model-name", default="fake-model")
    ap.add_argument("--vllm", action="store_true")
    ap.add_argument("--child-pid-file", default="")
    a = ap.parse_args(argv)
    if a.child_pid_file:
        import subprocess
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # a python, as vLLM's
        with open(a.child_pid_file, "w") as f:
            f.write(str(child.pid))
    t_start = time.monotonic()
    slots = threading.Semaphore(a.slots)
    seen = [0]
    lock = threading.Lock()

    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _json(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                loading = time.monotonic() - t_start < a.load_s
                self._json(503 if loading else 200, {"status": "loading model" if loading else "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": a.model_name}]})
            else:
                self._json(404, {"error": "not found"})

        def _chunk(self, obj):
            data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                seen[0] += 1
                if a.die_after and seen[0] > a.die_after:
                    os._exit(3)
            n, prompt = int(body["max_tokens"]), body["prompt"]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            with slots:
                time.sleep(a.ttft)
                for i in range(n):
                    if i:
                        time.sleep(a.tpot)
                    choice = {"text": "" if a.vllm and i % 2 else f"{i:x}", "index": 0, "finish_reason": None}
                    if a.vllm and body.get("return_token_ids"):
                        choice["token_ids"] = [i]
                    self._chunk({"choices": [choice]})
                final = {"choices": [{"text": "", "index": 0, "finish_reason": "length"}]}
                if not a.no_usage:
                    final["usage"] = {"completion_tokens": n, "prompt_tokens": len(prompt),
                                      "total_tokens": n + len(prompt), "prompt_tokens_details": {"cached_tokens": 0}}
                self._chunk(final)
                self._chunk("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

    ThreadingHTTPServer(("127.0.0.1", a.port), H).serve_forever()


if __name__ == "__main__":
    main()
