"""A minimal Kubernetes API server for the agent's API adapter: the list/watch protocol the
official client speaks, for SockPolicy objects and pods, plus the status subresource (JSON merge
patch) and Events. Not a Kubernetes: no authentication, no validation, one resourceVersion
counter for everything, an event history that `compact()` drops (then a watch from an older
version gets `410 Gone`, as from an API server whose etcd compacted it).

Watch responses are JSON lines, one event per line and per chunk (chunked transfer encoding),
ending at the watch's timeoutSeconds (or when `end_watches()` says so), as the API server's.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

POLICIES = "/apis/sockpol.io/v1alpha1/sockpolicies"
PODS = "/api/v1/pods"


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


class FakeAPI:
    def __init__(self) -> None:
        self.version = 100
        self.objects: dict[str, dict[str, dict]] = {"sockpolicies": {}, "pods": {}}
        self.history: list[tuple[int, str, str, dict]] = []  # (version, resource, type, obj)
        self.oldest = self.version  # a watch from before this gets 410 Gone
        self.requests: list[tuple[str, str]] = []  # (method, path with query)
        self.patches: list[tuple[str, str, dict]] = []  # (path, content type, body)
        self.events: list[dict] = []
        self.cond = threading.Condition()
        self._epoch = 0  # end_watches() bumps it: open watches end
        self._frozen = 0  # freeze_watches() bumps it: open watches go silent, never end
        self._closed = False
        self.hold = False  # while True, open watches send nothing (a watch that is down)
        self.uninstalled: set[str] = set()  # resources answered 404 (a CRD not installed)
        handler = type("Handler", (_Handler,), {"api": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        with self.cond:
            self._closed = True
        self.end_watches()
        self.server.shutdown()
        self.server.server_close()

    # -- changing the world ---------------------------------------------------------------------

    def put(self, resource: str, obj: dict) -> dict:
        with self.cond:
            self.version += 1
            meta = obj.setdefault("metadata", {})
            meta["resourceVersion"] = str(self.version)
            meta.setdefault("uid", f"uid-{meta['name']}")
            meta.setdefault("generation", 1)
            key = f"{meta.get('namespace', '')}/{meta['name']}"
            kind = "MODIFIED" if key in self.objects[resource] else "ADDED"
            self.objects[resource][key] = obj
            self.history.append((self.version, resource, kind, json.loads(json.dumps(obj))))
            self.cond.notify_all()
            return obj

    def delete(self, resource: str, namespace: str, name: str) -> None:
        with self.cond:
            self.version += 1
            obj = self.objects[resource].pop(f"{namespace}/{name}")
            obj["metadata"]["resourceVersion"] = str(self.version)
            self.history.append((self.version, resource, "DELETED", obj))
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget the history: watches from before now get 410 Gone."""
        with self.cond:
            self.history.clear()
            self.oldest = self.version

    def end_watches(self) -> None:
        with self.cond:
            self._epoch += 1
            self.cond.notify_all()

    def freeze_watches(self) -> None:
        """The open watches' connections go dead, as in a network partition: nothing more
        arrives on them and they never end (not even at their timeoutSeconds). Requests made
        afterwards are answered as usual."""
        with self.cond:
            self._frozen += 1
            self.cond.notify_all()

    def count(self, method: str, prefix: str, watch: bool | None = None) -> int:
        n = 0
        for m, p in list(self.requests):
            is_watch = "watch=true" in p.lower() or "watch=1" in p
            if m == method and p.startswith(prefix) and (watch is None or watch == is_watch):
                n += 1
        return n


class _Handler(BaseHTTPRequestHandler):
    api: FakeAPI
    protocol_version = "HTTP/1.1"  # watches are chunked, one event per chunk, as served

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    def _json(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        api = self.api
        api.requests.append(("GET", self.path))
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        resource = {POLICIES: "sockpolicies", PODS: "pods"}.get(url.path)
        if resource is None or resource in api.uninstalled:
            self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
            return
        selector = query.get("fieldSelector", "")
        node = selector.removeprefix("spec.nodeName=") if selector else None

        def visible(obj: dict) -> bool:
            return node is None or (obj.get("spec") or {}).get("nodeName") == node

        if query.get("watch") in ("true", "1"):
            self._watch(resource, int(query.get("resourceVersion") or 0), visible,
                        float(query.get("timeoutSeconds") or 30))  # fmt: skip
            return
        with api.cond:
            items = [o for o in api.objects[resource].values() if visible(o)]
            body = {"kind": "List", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(api.version)}, "items": items}  # fmt: skip
        self._json(200, body)

    def _watch(self, resource: str, since: int, visible, timeout: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            self._stream(resource, since, visible, timeout)
        finally:
            self.wfile.write(b"0\r\n\r\n")
            self.close_connection = True

    def _send_line(self, event: dict) -> None:
        line = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
        self.wfile.flush()

    def _stream(self, resource: str, since: int, visible, timeout: float) -> None:
        api = self.api
        deadline = time.monotonic() + timeout
        with api.cond:
            epoch, frozen = api._epoch, api._frozen
            if since < api.oldest:
                gone = {"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "message": f"too old resource version: {since} ({api.oldest})",
                    "reason": "Expired", "code": 410}}  # fmt: skip
                self._send_line(gone)
                return
            sent = since
            while True:
                if api._frozen != frozen:
                    while not api._closed:
                        api.cond.wait(0.5)
                    return
                for version, res, kind, obj in [] if api.hold else api.history:
                    if version > sent and res == resource:
                        sent = version
                        if visible(obj):
                            self._send_line({"type": kind, "object": obj})
                left = deadline - time.monotonic()
                if left <= 0 or api._epoch != epoch:
                    return
                api.cond.wait(min(left, 0.5))

    def do_PATCH(self) -> None:  # noqa: N802
        api = self.api
        api.requests.append(("PATCH", self.path))
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        api.patches.append((self.path, self.headers.get("Content-Type", ""), body))
        parts = urlparse(self.path).path.split("/")
        # /apis/sockpol.io/v1alpha1/namespaces/NS/sockpolicies/NAME/status
        if len(parts) != 9 or parts[6] != "sockpolicies" or parts[8] != "status":
            self._json(404, {"kind": "Status", "code": 404})
            return
        key = f"{parts[5]}/{parts[7]}"
        with api.cond:
            obj = api.objects["sockpolicies"].get(key)
            if obj is None:
                self._json(404, {"kind": "Status", "code": 404, "reason": "NotFound"})
                return
            obj["status"] = merge_patch(obj.get("status"), body.get("status"))
            # As the API server: a new resourceVersion, a MODIFIED event to every watch (the
            # generation stays: the status subresource does not change the spec).
            api.version += 1
            obj["metadata"]["resourceVersion"] = str(api.version)
            api.history.append(
                (api.version, "sockpolicies", "MODIFIED", json.loads(json.dumps(obj)))
            )
            api.cond.notify_all()
        self._json(200, obj)

    def do_POST(self) -> None:  # noqa: N802
        api = self.api
        api.requests.append(("POST", self.path))
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        api.events.append(body)
        body.setdefault("metadata", {})["name"] = f"ev{len(api.events)}"
        self._json(201, body)
