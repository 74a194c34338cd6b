"""Real HTTP servers, each configured with routes that report which route served a request.

Every server answers a request it routes with status 200, a header `X-Route: NAME` and the body
`NAME`, where NAME is one of `ROUTES` (or, for the servers that serve files, the canonical path
of the file it resolved, `X-Route` then missing and the body `path=/...`), and `X-Vhost:
internal` or `default` for the virtual host it picked. The routes are the same path sets on
every server, written the way that server is configured (nginx prefix, exact and regex
locations; HAProxy path ACLs; Apache <Location>/<LocationMatch>; servlet mappings and static
files in Tomcat; a Node and a Python handler), so on canonical paths they agree; where they
disagree on a spelling, sockpol must refuse it (tests/servers/test_servers.py).

Each server is started as a child process bound to 127.0.0.1 on a free port, with its
configuration in a temporary directory; `start()` waits (bounded) until it accepts connections.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Route name -> (canonical representative path, description). The representative is what the
# policy is asked about when a server says it served that route.
ROUTES = {
    "admin": "/admin/x",  # /admin and everything under /admin/
    "public": "/public/x",  # /public and everything under /public/
    "user": "/api/v1/users/7",  # /api/v1/users/<one segment>
    "orders": "/api/v1/orders",  # exactly
    "css": "/static/a.css",  # /static/<one segment ending in .css>
    "health": "/healthz",  # exactly
    "rpc": "/api/v1/jobs:run",  # exactly (a sub-delim in a route)
    "internal": "/internal/x",  # /internal/... on the vhost internal.example.com only
    "other": "/zz-other",  # everything else
}
INTERNAL_HOST = "internal.example.com"
DEFAULT_HOST = "www.example.com"

# The canonical paths the file-serving servers have files for (their content: `path=<path>`).
FILES = [
    "/admin/x", "/admin/users", "/admin/a/b", "/public/x", "/public/users", "/public/a/b",
    "/api/v1/users/7", "/api/v1/orders", "/static/a.css", "/healthz", "/api/v1/jobs:run",
    "/internal/x", "/zz-other", "/public/admin", "/admin/public",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on {port} after {timeout} s")


@dataclass
class Server:
    """One server process (possibly listening on several ports, one per `Endpoint`)."""

    name: str
    binary: str  # what must be installed (a command on PATH or an absolute path)
    package: str  # the Debian package that brings it
    endpoints: list[Endpoint] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    workdir: Path | None = None
    start_timeout: float = 15.0

    def available(self) -> bool:
        return shutil.which(self.binary) is not None or Path(self.binary).exists()

    def configure(self, workdir: Path) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        argv = self.configure(workdir)
        log = open(workdir / "server.log", "wb")  # noqa: SIM115 -- closed with the process
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True,
            cwd=workdir,
        )  # fmt: skip
        try:
            for ep in self.endpoints:
                wait_listening(ep.port, self.proc, self.start_timeout)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{self.name}: {e}; log: {self.log_tail()}") from None

    def log_tail(self, n: int = 2000) -> str:
        if self.workdir is None:
            return ""
        text = (self.workdir / "server.log").read_bytes().decode("latin-1", "replace")
        return text[-n:]

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        self.proc = None


@dataclass
class Endpoint:
    """Where one configuration of a server listens: `label` names it in reports
    (e.g. `nginx` and `nginx-merge-off`)."""

    label: str
    port: int
    files: bool = False  # it serves files (the body names the canonical path), not routes
    vhosts: bool = True  # it picks a virtual host (X-Vhost)


# -- nginx ------------------------------------------------------------------------------------


def _nginx_locations() -> str:
    def route(name: str) -> str:
        return (
            f"add_header X-Route {name} always; add_header X-Vhost $vhost always; "
            f'return 200 "{name}";'
        )

    return textwrap.dedent(
        f"""\
        location = /admin {{ {route("admin")} }}
        location /admin/ {{ {route("admin")} }}
        location = /public {{ {route("public")} }}
        location /public/ {{ {route("public")} }}
        location ~ ^/api/v1/users/[^/]+$ {{ {route("user")} }}
        location = /api/v1/orders {{ {route("orders")} }}
        location ~ ^/static/[^/]*\\.css$ {{ {route("css")} }}
        location = /healthz {{ {route("health")} }}
        location = /api/v1/jobs:run {{ {route("rpc")} }}
        location / {{ {route("other")} }}
        """
    )


class Nginx(Server):
    def __init__(self) -> None:
        super().__init__("nginx", "/usr/sbin/nginx", "nginx")
        self.endpoints = [
            Endpoint("nginx", free_port()),
            Endpoint("nginx-merge-slashes-off", free_port()),
        ]

    def configure(self, workdir: Path) -> list[str]:
        servers = []
        for ep, merge in zip(self.endpoints, ("on", "off"), strict=True):
            locations = textwrap.indent(_nginx_locations(), " " * 8)
            internal = locations.replace('"other";', '"other";', 1)
            servers.append(
                f"""
    server {{
        listen 127.0.0.1:{ep.port} default_server;
        server_name {DEFAULT_HOST};
        merge_slashes {merge};
        set $vhost default;
{locations}
    }}
    server {{
        listen 127.0.0.1:{ep.port};
        server_name {INTERNAL_HOST};
        merge_slashes {merge};
        set $vhost internal;
        location /internal/ {{ add_header X-Route internal always;
            add_header X-Vhost $vhost always; return 200 "internal"; }}
{internal}
    }}"""
            )
        conf = f"""
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 1000;
    default_type text/plain;
{"".join(servers)}
}}
"""
        (workdir / "nginx.conf").write_text(conf)
        return [self.binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf")]


# -- HAProxy ----------------------------------------------------------------------------------


class HAProxy(Server):
    def __init__(self) -> None:
        super().__init__("haproxy", "/usr/sbin/haproxy", "haproxy")
        self.endpoints = [Endpoint("haproxy", free_port())]

    def configure(self, workdir: Path) -> list[str]:
        acls = [
            ("admin", "{ path /admin } || { path_beg /admin/ }"),
            ("public", "{ path /public } || { path_beg /public/ }"),
            ("user", "{ path_reg ^/api/v1/users/[^/]+$ }"),
            ("orders", "{ path /api/v1/orders }"),
            ("css", "{ path_reg ^/static/[^/]*\\.css$ }"),
            ("health", "{ path /healthz }"),
            ("rpc", "{ path /api/v1/jobs:run }"),
        ]
        rules = [
            "http-request return status 200 content-type text/plain string internal "
            "hdr X-Route internal hdr X-Vhost internal if internal { path_beg /internal/ }"
        ]
        for name, cond in acls:
            rules.append(
                f"http-request return status 200 content-type text/plain string {name} "
                f"hdr X-Route {name} hdr X-Vhost %[var(txn.vhost)] if {cond}"
            )
        rules.append(
            "http-request return status 200 content-type text/plain string other "
            "hdr X-Route other hdr X-Vhost %[var(txn.vhost)]"
        )
        rule_text = "\n    ".join(rules)
        conf = f"""
global
    maxconn 256
    pidfile {workdir}/haproxy.pid
defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s
    timeout http-request 5s
    option http-keep-alive
frontend routes
    bind 127.0.0.1:{self.endpoints[0].port}
    acl internal req.hdr(host),lower,field(1,:) -m str {INTERNAL_HOST}
    http-request set-var(txn.vhost) str(default)
    http-request set-var(txn.vhost) str(internal) if internal
    {rule_text}
"""
        (workdir / "haproxy.cfg").write_text(conf)
        return [self.binary, "-db", "-f", str(workdir / "haproxy.cfg")]


# -- Apache httpd -----------------------------------------------------------------------------


class Apache(Server):
    def __init__(self) -> None:
        super().__init__("apache", "/usr/sbin/apache2", "apache2")
        self.endpoints = [Endpoint("apache", free_port())]

    def configure(self, workdir: Path) -> list[str]:
        mods = "/usr/lib/apache2/modules"
        (workdir / "route.txt").write_text("routed\n")
        os.chmod(workdir, 0o755)
        os.chmod(workdir / "route.txt", 0o644)

        def locations(vhost: str) -> str:
            sections = [
                ("Location", "/admin", "admin"),
                ("LocationMatch", "^/admin.+", "other"),
                ("LocationMatch", "^/admin/", "admin"),
                ("LocationMatch", "^/public(/|$)", "public"),
                ("LocationMatch", "^/api/v1/users/[^/]+$", "user"),
                ("LocationMatch", "^/api/v1/orders$", "orders"),
                ("LocationMatch", "^/static/[^/]*\\.css$", "css"),
                ("LocationMatch", "^/healthz$", "health"),
                ("LocationMatch", "^/api/v1/jobs:run$", "rpc"),
            ]
            if vhost == "internal":
                sections.append(("LocationMatch", "^/internal/", "internal"))
            out = [f"Header always set X-Vhost {vhost}", "Header always set X-Route other"]
            for kind, where, name in sections:
                out.append(f'<{kind} "{where}">\n    Header always set X-Route {name}\n</{kind}>')
            return "\n".join(out)

        port = self.endpoints[0].port
        conf = f"""
ServerRoot {workdir}
PidFile {workdir}/apache.pid
ErrorLog {workdir}/error.log
LogLevel warn
Listen 127.0.0.1:{port}
LoadModule mpm_event_module {mods}/mod_mpm_event.so
LoadModule authz_core_module {mods}/mod_authz_core.so
LoadModule alias_module {mods}/mod_alias.so
LoadModule headers_module {mods}/mod_headers.so
User www-data
Group www-data
ServerName {DEFAULT_HOST}
DocumentRoot {workdir}
KeepAlive On
MaxKeepAliveRequests 1000
Timeout 5
<Directory />
    Require all granted
</Directory>
AliasMatch "^/" "{workdir}/route.txt"
<VirtualHost 127.0.0.1:{port}>
    ServerName {DEFAULT_HOST}
{locations("default")}
</VirtualHost>
<VirtualHost 127.0.0.1:{port}>
    ServerName {INTERNAL_HOST}
{locations("internal")}
</VirtualHost>
"""
        (workdir / "apache.conf").write_text(conf)
        return [self.binary, "-f", str(workdir / "apache.conf"), "-DFOREGROUND"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("APACHE_RUN_DIR", str(self.workdir))
        env.setdefault("APACHE_LOCK_DIR", str(self.workdir))
        return env


# -- Tomcat (servlet container; static files through its DefaultServlet) ---------------------


TOMCAT_HOME = Path("/usr/share/tomcat10")


class Tomcat(Server):
    def __init__(self) -> None:
        super().__init__("tomcat", str(TOMCAT_HOME / "bin/catalina.sh"), "tomcat10")
        self.endpoints = [Endpoint("tomcat", free_port(), files=True)]
        self.start_timeout = 40.0

    def configure(self, workdir: Path) -> list[str]:
        for sub in ("conf", "logs", "temp", "work"):
            (workdir / sub).mkdir(exist_ok=True)
        shutil.copy("/etc/tomcat10/web.xml", workdir / "conf/web.xml")
        shutil.copy("/etc/tomcat10/catalina.properties", workdir / "conf/catalina.properties")
        for vhost, base in (("default", "webapps"), ("internal", "webapps-internal")):
            write_files(workdir / base / "ROOT", vhost)
        port = self.endpoints[0].port
        (workdir / "conf/server.xml").write_text(
            f"""<?xml version="1.0" encoding="UTF-8"?>
<Server port="-1" shutdown="SHUTDOWN">
  <Service name="Catalina">
    <Connector port="{port}" address="127.0.0.1" protocol="HTTP/1.1"
               connectionTimeout="5000" keepAliveTimeout="5000" maxKeepAliveRequests="1000"/>
    <Engine name="Catalina" defaultHost="{DEFAULT_HOST}">
      <Host name="{DEFAULT_HOST}" appBase="webapps" unpackWARs="false" autoDeploy="false"/>
      <Host name="{INTERNAL_HOST}" appBase="webapps-internal" unpackWARs="false"
            autoDeploy="false"/>
    </Engine>
  </Service>
</Server>
"""
        )
        return [self.binary, "run"]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CATALINA_HOME=str(TOMCAT_HOME),
            CATALINA_BASE=str(self.workdir),
            CATALINA_TMPDIR=str(self.workdir / "temp"),
            JAVA_OPTS="-Xms64m -Xmx256m -XX:TieredStopAtLevel=1 -Xshare:auto",
        )
        return env


def write_files(root: Path, vhost: str) -> None:
    """The file tree of the file-serving servers: one file per canonical path in FILES."""
    for path in FILES:
        f = root / path.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(f"path={path} vhost={vhost}\n")


# -- Node's http (two routers: the raw request target, and WHATWG URL's pathname) -------------

NODE_SCRIPT = r"""
const http = require('http');
const [rawPort, urlPort, internal] = process.argv.slice(2);
const ROUTES = [
  ['admin', /^\/admin(\/.*)?$/], ['public', /^\/public(\/.*)?$/],
  ['user', /^\/api\/v1\/users\/[^/]+$/], ['orders', /^\/api\/v1\/orders$/],
  ['css', /^\/static\/[^/]*\.css$/], ['health', /^\/healthz$/],
  ['rpc', /^\/api\/v1\/jobs:run$/],
];
function vhostOf(req) {
  try { return new URL('http://' + (req.headers.host || '')).hostname === internal
        ? 'internal' : 'default'; } catch (e) { return 'default'; }
}
function route(path, vhost) {
  if (vhost === 'internal' && /^\/internal\//.test(path)) return 'internal';
  for (const [name, re] of ROUTES) if (re.test(path)) return name;
  return 'other';
}
function serve(pathOf) {
  return (req, res) => {
    req.on('data', () => {});
    req.on('end', () => {
      const vhost = vhostOf(req);
      let name;
      try { name = route(pathOf(req.url), vhost); } catch (e) { res.statusCode = 400;
        res.end(); return; }
      res.writeHead(200, {'X-Route': name, 'X-Vhost': vhost, 'Content-Type': 'text/plain',
                          'Content-Length': Buffer.byteLength(name)});
      res.end(name);
    });
  };
}
const opts = {keepAliveTimeout: 5000};
http.createServer(opts, serve(u => u.split('?')[0])).listen(+rawPort, '127.0.0.1');
http.createServer(opts, serve(u => new URL(u, 'http://h').pathname))
  .listen(+urlPort, '127.0.0.1');
"""


class Node(Server):
    def __init__(self) -> None:
        super().__init__("node", "node", "nodejs")
        self.endpoints = [Endpoint("node", free_port()), Endpoint("node-url", free_port())]

    def configure(self, workdir: Path) -> list[str]:
        (workdir / "server.js").write_text(NODE_SCRIPT)
        ports = [str(ep.port) for ep in self.endpoints]
        return [shutil.which(self.binary) or self.binary, "server.js", *ports, INTERNAL_HOST]


# -- Python's http.server (the stdlib's own view of a path: SimpleHTTPRequestHandler's) -------

PYTHON_SCRIPT = r"""
import posixpath, re, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

ROUTES = [
    ("admin", r"/admin(/.*)?"), ("public", r"/public(/.*)?"), ("user", r"/api/v1/users/[^/]+"),
    ("orders", r"/api/v1/orders"), ("css", r"/static/[^/]*\.css"), ("health", r"/healthz"),
    ("rpc", r"/api/v1/jobs:run"),
]
INTERNAL = sys.argv[2]

def path_of(target):
    # What SimpleHTTPRequestHandler.translate_path makes of a target, as a URL path.
    path = unquote(urlsplit(target).path)
    trailing = path.endswith("/")
    path = posixpath.normpath(path)
    if path.startswith("//"):
        path = path[1:]
    return path + ("/" if trailing and path != "/" else "")

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def handle_one(self):
        if self.headers.get("Transfer-Encoding") is not None:
            self.send_error(501, "chunked bodies not supported")
            self.close_connection = True
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        vhost = "internal" if host == INTERNAL else "default"
        path = path_of(self.path)
        name = "other"
        if vhost == "internal" and path.startswith("/internal/"):
            name = "internal"
        else:
            name = next((n for n, r in ROUTES if re.fullmatch(r, path)), "other")
        body = name.encode()
        self.send_response(200)
        self.send_header("X-Route", name)
        self.send_header("X-Vhost", vhost)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.handle_one
        raise AttributeError(name)

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


class PythonHTTP(Server):
    def __init__(self) -> None:
        super().__init__("python", "python3", "python3")
        self.endpoints = [Endpoint("python-http.server", free_port())]

    def configure(self, workdir: Path) -> list[str]:
        (workdir / "server.py").write_text(PYTHON_SCRIPT)
        python = shutil.which("python3") or "python3"
        return [python, "server.py", str(self.endpoints[0].port), INTERNAL_HOST]


def all_servers() -> list[Server]:
    return [Nginx(), HAProxy(), Apache(), Tomcat(), Node(), PythonHTTP()]


def start_servers(workdir: Path) -> tuple[list[Server], list[str]]:
    """Start every server that is installed; (started, problems)."""
    started, problems = [], []
    for server in all_servers():
        if not server.available():
            problems.append(f"{server.name}: not installed (Debian package {server.package})")
            continue
        try:
            server.start(workdir / server.name)
        except Exception as e:  # a server that does not start is reported, not fatal here
            problems.append(f"{server.name}: did not start: {e}")
            continue
        started.append(server)
    return started, problems


@contextmanager
def running_endpoints(prefix: str, problems: list[str]) -> Iterator[list[Endpoint]]:
    """Every installed server started in a fresh directory, as endpoints; stopped and removed
    after. Servers that are missing or fail go into `problems`. Under CI=true a missing server
    fails the caller's test; elsewhere fewer than four skip it loudly (pytest.skip/fail raise
    through here, so the servers that did start are stopped either way)."""
    import pytest  # only the fixtures use this; servers.py itself runs without pytest

    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)  # Apache's workers (www-data) read a file in it
    started, found = start_servers(workdir)
    problems.extend(found)
    try:
        if found and os.environ.get("CI") == "true":
            pytest.fail("server oracle on CI without every server: " + "; ".join(found))
        if len(started) < 4:
            pytest.skip(f"SERVER ORACLE SKIPPED: fewer than four servers ({'; '.join(found)})")
        yield [ep for s in started for ep in s.endpoints]
    finally:
        for s in started:
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)
