"""A fault-injecting reverse proxy in front of gcp-storage-emulator: `python tests/gcs_proxy.py PORT UPSTREAM_PORT`.

Clients (gcsfs, tensorstore) talk to this proxy. It fills the emulator's gaps that break them: listings ignore
startOffset/endOffset (tensorstore's range delete would then delete the whole bucket), no x-goog-generation header
on downloads and no ifGeneration(Not)Match preconditions (tensorstore's conditional writes), no moveTo (gcsfs
rename), empty 404 bodies. And it injects faults by rule (tests/gcs_emulator.py's `GcsServer.fault`):

  POST /__fault/rules {"rules": [RULE, ...]}   append rules      POST /__fault/clear   drop rules and the log
  GET  /__fault/log                            served requests as JSON [{"method", "path", "range", "host",
                                               "name", "fault"}] (host: the client's Host header, so tests
                                               can tell clients apart; name: an upload's object name)

RULE: "path_re" (searched in the URL-decoded "path?query"), "method", "times" (matches to fault, -1 = forever,
default 1), "after" (let the first K matches through), and one action: "status" (answer it with a GCS-style JSON
error), "truncate" (forward, keep N body bytes, honest length), "cut" (announce the full length, send N bytes,
close: a connection cut mid-body), "flip" (forward, XOR one byte with N: the byte at object offset "at" when the
response holds it (ranged reads included; tensorstore merges adjacent chunks into one range), else the body's middle
byte). truncate and flip also drop the stored hash header: they model the object as stored, changed.
"""
import http.client
import json
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

UPSTREAM = ("127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 0)
_rules: list[dict] = []
_log: list[dict] = []
_lock = threading.Lock()
_store = threading.RLock()  # one writer / media read at a time: (content, generation) pairs stay consistent

REASONS = {401: "required", 403: "forbidden", 404: "notFound", 412: "conditionNotMet", 429: "rateLimitExceeded",
           500: "backendError", 503: "backendError"}
MESSAGES = {401: "Anonymous caller does not have storage.objects.get access.",
            403: "caller does not have storage.objects.get access to the Google Cloud Storage object.",
            404: "No such object", 412: "At least one of the pre-conditions you specified did not hold.",
            429: "The object exceeded the rate limit for object mutation operations.",
            503: "We encountered an internal error. Please try again."}
OBJECT = re.compile(r"^(?:/download)?/storage/v1/b/([^/]+)/o/([^?]+)$")
UPLOAD = re.compile(r"^/upload/storage/v1/b/([^/]+)/o$")
LISTING = re.compile(r"^/storage/v1/b/([^/]+)/o$")
MOVE = re.compile(r"^/storage/v1/b/([^/]+)/o/(.+)/moveTo/o/(.+)$")


def error_body(status: int, message: str | None = None) -> bytes:
  message = message or MESSAGES.get(status, "error")
  return json.dumps({"error": {"code": status, "message": message, "errors": [
      {"message": message, "domain": "global", "reason": REASONS.get(status, "error")}]}}).encode()


def upstream(method: str, path: str, body: bytes | None = None, headers: dict | None = None):
  conn = http.client.HTTPConnection(*UPSTREAM, timeout=60)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.getheaders(), response.read()
  finally:
    conn.close()


def generation(bucket: str, name: str) -> tuple[int | None, dict]:
  status, _, body = upstream("GET", f"/storage/v1/b/{bucket}/o/{quote(name, safe='')}")
  if status != 200:
    return None, {}
  meta = json.loads(body)
  return int(meta["generation"]), meta


def matching_rule(method: str, target: str) -> dict | None:
  with _lock:
    for rule in _rules:
      if rule.get("method") not in (None, method) or not re.search(rule.get("path_re", ""), target):
        continue
      rule["_seen"] = rule.get("_seen", 0) + 1
      if rule["_seen"] <= rule.get("after", 0) or rule.get("times", 1) == 0:
        continue
      if rule.get("times", 1) > 0:
        rule["times"] = rule.get("times", 1) - 1
      return dict(rule)
  return None


def upload_name(target: str, body: bytes) -> str | None:
  """The object an upload writes: `name=` in the query (media uploads) or the metadata JSON at the start of a
  multipart or resumable upload's body."""
  if not UPLOAD.match(urlsplit(target).path):
    return None
  query = parse_qs(urlsplit(target).query)
  if "name" in query:
    return query["name"][0]
  found = re.search(rb'"name"\s*:\s*"([^"]+)"', body[:4096])
  return found.group(1).decode() if found else None


class Handler(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"

  def log_message(self, *args):  # quiet
    pass

  def _read_body(self) -> bytes:
    if self.headers.get("Content-Length"):
      return self.rfile.read(int(self.headers["Content-Length"]))
    if (self.headers.get("Transfer-Encoding") or "").lower() != "chunked":
      return b""
    data = b""
    while True:
      size = int(self.rfile.readline().strip() or b"0", 16)
      if size == 0:
        self.rfile.readline()
        return data
      data += self.rfile.read(size)
      self.rfile.readline()

  def _reply(self, status: int, headers, body: bytes, cut: int | None = None) -> None:
    self.send_response(status)
    for k, v in headers:
      if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
        self.send_header(k, v)
    self.send_header("Content-Length", str(len(body)))
    if cut is not None:
      self.send_header("Connection", "close")
    self.end_headers()
    self.wfile.write(body if cut is None else body[:cut])
    if cut is not None:
      self.wfile.flush()
      self.close_connection = True

  def _handle(self, method: str) -> None:
    body = self._read_body() if method in ("POST", "PUT", "PATCH") else b""
    if self.path.startswith("/__fault"):
      return self._control(method, body)
    target = unquote(self.path)
    rule = matching_rule(method, target) or {}
    action = next((a for a in ("status", "truncate", "cut", "flip") if a in rule), None)
    with _lock:
      _log.append({"method": method, "path": target, "range": self.headers.get("Range"),
                   "host": self.headers.get("Host"), "name": upload_name(target, body),
                   "fault": action and f"{action}={rule[action]}"})
    if action == "status":
      return self._reply(rule["status"], [("Content-Type", "application/json")],
                         error_body(rule["status"], rule.get("message")))
    status, headers, data = self._forward(method, body)
    if status == 404 and not data:  # clients parse the JSON error
      headers, data = [("Content-Type", "application/json")], error_body(404, f"No such object: {target}")
    if status in (200, 206) and data and action in ("truncate", "flip"):
      # The object as stored changed: its stored hash with it (else tensorstore's CRC-32C check of whole-object
      # reads would catch what a corruption before the upload, or a truncated upload, leaves undetected).
      headers = [(k, v) for k, v in headers if k.lower() != "x-goog-hash"]
      if action == "truncate":
        data = data[:rule["truncate"]]
      elif action == "flip":
        first = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
        at = len(data) // 2 if "at" not in rule else rule["at"] - (int(first.group(1)) if first else 0)
        if 0 <= at < len(data):
          data = data[:at] + bytes([data[at] ^ int(rule["flip"])]) + data[at + 1:]
    self._reply(status, headers, data, cut=rule.get("cut") if action == "cut" else None)

  def _forward(self, method: str, body: bytes):
    parts = urlsplit(self.path)
    query = parse_qs(parts.query)
    headers = {k: v for k, v in self.headers.items()
               if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length")}
    if body:
      headers["Content-Length"] = str(len(body))
    move = MOVE.match(parts.path)
    if method == "POST" and move:  # rename = copy + delete
      bucket, src, dst = move.groups()
      with _store:
        status, h, data = upstream("POST", f"/storage/v1/b/{bucket}/o/{src}/copyTo/b/{bucket}/o/{dst}", b"{}",
                                   {"Content-Type": "application/json"})
        if status == 200:
          upstream("DELETE", f"/storage/v1/b/{bucket}/o/{src}")
      return status, h, data
    if method == "GET" and LISTING.match(parts.path) and ("startOffset" in query or "endOffset" in query):
      status, h, data = upstream(method, self.path, None, headers)
      if status == 200:
        lo, hi = query.get("startOffset", [""])[0], query.get("endOffset", [None])[0]
        doc = json.loads(data)
        doc["items"] = [i for i in doc.get("items") or [] if i["name"] >= lo and (hi is None or i["name"] < hi)]
        data = json.dumps(doc).encode()
      return status, h, data
    obj, up = OBJECT.match(parts.path), UPLOAD.match(parts.path)
    bucket, name = (obj.group(1), unquote(obj.group(2))) if obj else (
        (up.group(1), query["name"][0]) if up and "name" in query else (None, None))
    media = "alt=media" in self.path or parts.path.startswith("/download/")
    with _store if (method != "GET" or media) else _NoLock():
      match, not_match = query.get("ifGenerationMatch", [None])[0], query.get("ifGenerationNotMatch", [None])[0]
      if name is not None and (match is not None or not_match is not None):
        current, _ = generation(bucket, name)
        if match is not None and int(match) != (current or 0):
          return 412, [("Content-Type", "application/json")], error_body(412)
        if not_match is not None and current is not None and int(not_match) == current and method == "GET":
          return 304, [], b""
      status, h, data = upstream(method, self.path, body or None, headers)
      if method == "GET" and obj and media and status in (200, 206) and not any(
          k.lower() == "x-goog-generation" for k, _ in h):
        current, meta = generation(bucket, name)
        if current is not None:
          h = list(h) + [("x-goog-generation", str(current)),
                         ("x-goog-metageneration", str(meta.get("metageneration", "1")))]
      return status, h, data

  def _control(self, method: str, body: bytes) -> None:
    out = b"ok"
    with _lock:
      if self.path == "/__fault/rules" and method == "POST":
        _rules.extend(json.loads(body)["rules"])
      elif self.path == "/__fault/clear":
        _rules.clear()
        _log.clear()
      elif self.path == "/__fault/log":
        out = json.dumps(_log).encode()
      else:
        out = b"unknown control path"
    self._reply(200, [("Content-Type", "application/json")], out)

  def do_GET(self):  # pylint: disable=invalid-name
    self._handle("GET")

  def do_POST(self):  # pylint: disable=invalid-name
    self._handle("POST")

  def do_PUT(self):  # pylint: disable=invalid-name
    self._handle("PUT")

  def do_DELETE(self):  # pylint: disable=invalid-name
    self._handle("DELETE")

  def do_PATCH(self):  # pylint: disable=invalid-name
    self._handle("PATCH")

  def do_HEAD(self):  # pylint: disable=invalid-name
    self._handle("HEAD")


class _NoLock:

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


if __name__ == "__main__":
  server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
  server.daemon_threads = True
  print("ready", flush=True)
  server.serve_forever()
