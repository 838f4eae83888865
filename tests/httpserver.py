"""A local HTTP file server on 127.0.0.1 that requires HTTP Basic credentials (tests of URLs with
a password in them): GET with Range, HEAD, in a thread."""
import base64
import contextlib
import http.server
import os
import threading


def handler(folder: str, user: str, password: str):
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _file(self):
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="test"')
                self.end_headers()
                return None
            path = os.path.join(folder, self.path.lstrip("/").split("?")[0])
            if not os.path.isfile(path):
                self.send_response(404)
                self.end_headers()
                return None
            return path

        def do_HEAD(self):
            path = self._file()
            if path:
                self.send_response(200)
                self.send_header("Content-Length", str(os.path.getsize(path)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

        def do_GET(self):
            path = self._file()
            if not path:
                return
            data = open(path, "rb").read()
            start, end = 0, len(data) - 1
            ranged = self.headers.get("Range", "").removeprefix("bytes=")
            if ranged:
                a, _, b = ranged.partition("-")
                start, end = int(a or 0), min(int(b) if b else len(data) - 1, len(data) - 1)
            self.send_response(206 if ranged else 200)
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            self.wfile.write(data[start:end + 1])
    return Handler


@contextlib.contextmanager
def serve(folder: str, user: str, password: str):
    """Yields the base URL http://127.0.0.1:PORT (without credentials)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler(folder, user, password))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
