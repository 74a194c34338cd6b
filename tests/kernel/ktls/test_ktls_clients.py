"""Real TLS: nginx (Debian) with a self-signed certificate, and real clients in a test cgroup.

The policy's cgroup sock_ops program inserts each client connection into the sockhash when it is
established, before any TLS library touches the socket, which is the order kTLS needs. Clients:
- Python `ssl` with kTLS (`SSL_OP_ENABLE_KTLS`, 0x8; Python 3.11 has no name for it);
- `openssl s_client` with an OPENSSL_CONF whose system_default section says `Options = KTLS`;
- curl, which does TLS in user space: the program only ever sees TLS records (ciphertext).
The policy says `tls`: the client's handshake records pass, the requests are judged on the
plaintext kTLS shows the program. Verdicts are compared with the same requests over plaintext
HTTP (the same policy governs a plaintext port too), and nginx's access log says what reached
the server.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sockpol.compiler import compile_to_file
from sockpol.runtime import counters as rc
from sockpol.runtime import ktls, load, reload, status, unload

SSL_OP_ENABLE_KTLS = 0x8
POLICY_NAME = "ktls-clients"
POLICY = """\
policy ktls-clients {{
    port {ports}
    default deny
    {tls}
    allow GET /ok
    allow GET /public/**
}}
"""

# name -> (nginx ssl_protocols, nginx cipher setting, Python version, kernel cipher)
CASES = {
    "tls12-aes128": ("TLSv1.2", "ssl_ciphers ECDHE-RSA-AES128-GCM-SHA256;", ssl.TLSVersion.TLSv1_2),
    "tls12-aes256": ("TLSv1.2", "ssl_ciphers ECDHE-RSA-AES256-GCM-SHA384;", ssl.TLSVersion.TLSv1_2),
    "tls13-aes128": (
        "TLSv1.3",
        "ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;",
        ssl.TLSVersion.TLSv1_3,
    ),
    "tls13-aes256": (
        "TLSv1.3",
        "ssl_conf_command Ciphersuites TLS_AES_256_GCM_SHA384;",
        ssl.TLSVersion.TLSv1_3,
    ),
}
ALLOWED = ["/ok", "/public/a.txt"]
DENIED = ["/admin", "/public/../admin"]

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
events {{ worker_connections 64; }}
http {{
    log_format req '$server_port $request';
    access_log {dir}/access.log req;
    client_body_temp_path {dir}/tmp-body;
    proxy_temp_path {dir}/tmp-proxy;
    fastcgi_temp_path {dir}/tmp-fastcgi;
    uwsgi_temp_path {dir}/tmp-uwsgi;
    scgi_temp_path {dir}/tmp-scgi;
    ssl_certificate {cert};
    ssl_certificate_key {key};
{servers}
    server {{
        listen 127.0.0.1:{plain_port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""
NGINX_SERVER = """\
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_protocols {protocol};
        {ciphers}
        location / {{ return 200 "ok\\n"; }}
    }}
"""
OPENSSL_KTLS_CONF = """\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Options = KTLS
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Nginx:
    dir: Path
    ports: dict[str, int]  # case -> TLS port
    plain_port: int
    cert: Path

    def requests(self) -> list[str]:
        """'<port> <request line>' for every request nginx served or refused, in order."""
        log = self.dir / "access.log"
        return log.read_text().splitlines() if log.exists() else []

    def mark(self) -> int:
        """Where the access log ends now: tests share the ports, each reads its own lines."""
        return len(self.requests())

    def paths_on(self, port: int, since: int = 0) -> list[str]:
        out = []
        for line in self.requests()[since:]:
            p, _, request = line.partition(" ")
            if int(p) == port and request.count(" ") == 2:
                out.append(request.split(" ")[1])
        return out


@pytest.fixture(scope="module")
def nginx(
    ktls_kernel, self_signed: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(exe) or shutil.which("openssl") is None:
        pytest.fail("nginx and openssl are needed (scripts/test.sh installs them)", pytrace=False)
    d = tmp_path_factory.mktemp("nginx")
    cert, key = self_signed
    *tls_ports, plain_port = free_ports(len(CASES) + 1)
    ports = dict(zip(CASES, tls_ports, strict=True))
    servers = "".join(
        NGINX_SERVER.format(port=ports[c], protocol=CASES[c][0], ciphers=CASES[c][1]) for c in CASES
    )
    (d / "nginx.conf").write_text(
        NGINX_CONF.format(dir=d, servers=servers, plain_port=plain_port, cert=cert, key=key)
    )
    proc = subprocess.Popen(
        [exe, "-p", str(d), "-c", str(d / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_listening([*tls_ports, plain_port], proc)
        yield Nginx(d, ports, plain_port, cert)
    finally:
        proc.terminate()
        proc.wait(10)


def _wait_listening(ports: list[int], proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def policy_object(nginx: Nginx, tmp: Path, tls: str) -> Path:
    ports = ", ".join(str(p) for p in [*nginx.ports.values(), nginx.plain_port])
    text = POLICY.format(ports=ports, tls=tls)
    return compile_to_file(text, tmp / f"clients-{tls.replace(' ', '-') or 'plain'}.o", "c.pol")


@pytest.fixture
def governed(nginx: Nginx, cgroup: Path, tmp_path: Path) -> Iterator[Path]:
    """The test cgroup, with the `tls` policy loaded onto it; unloaded afterwards. (On a kernel
    that rejects TLS on sockhash sockets `load` refuses it: check_tls=False loads it there, to
    show what then happens to clients.)"""
    handle = load(policy_object(nginx, tmp_path, "tls"), cgroup, check_tls=False)
    handle.close()
    yield cgroup
    unload(POLICY_NAME)


def counters() -> rc.PolicyCounters:
    s = next(s for s in status() if s.name == POLICY_NAME)
    return rc.read_counters(s.pin_dir, s.metadata)


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()


# ---------------------------------------------------------------------------------------------
# Clients (they run in a child process inside the test cgroup)


def python_client(port: int, paths: list[str], cafile: str | None, version: int | None) -> list:
    """One connection per path (a refusal ends a connection). With cafile: TLS with kTLS."""
    results = []
    for path in paths:
        rec: dict = {"path": path}
        try:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock: socket.socket = raw
            if cafile is not None:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.load_verify_locations(cafile)
                ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion(version)
                ctx.options |= SSL_OP_ENABLE_KTLS
                sock = ctx.wrap_socket(raw, server_hostname="localhost")
                rec["cipher"] = sock.cipher()[0]
            with sock:
                sock.sendall(request(path))
                if cafile is not None:  # OpenSSL may set TLS_TX only with the first write
                    rec["ktls_tx"] = _has_tls_tx(sock)
                response = b""
                while chunk := sock.recv(4096):
                    response += chunk
                rec["status"] = response.split(b"\r\n", 1)[0].decode()
        except Exception as e:  # the refusal shows up as one of several exception types
            rec["error"] = f"{type(e).__name__}: {e}"
        results.append(rec)
    return results


def _has_tls_tx(sock: socket.socket) -> bool:
    """TLS_TX is set: getsockopt of just `struct tls_crypto_info` (version, cipher; 4 bytes)
    succeeds. (A longer buffer must match the cipher's struct exactly, else EINVAL; EBUSY
    when TLS_TX is not set.)"""
    try:
        version, cipher = struct.unpack("<HH", sock.getsockopt(ktls.SOL_TLS, ktls.TLS_TX, 4))
    except OSError:
        return False
    return version != 0 and cipher != 0


def outcome(rec: dict) -> str:
    return "served" if rec.get("status", "").endswith("200 OK") else "refused"


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("case", CASES)
def test_python_ssl_ktls_matches_plaintext(
    case: str, nginx: Nginx, governed: Path, run_in_cgroup, require_ktls_sockmap
) -> None:
    paths = ALLOWED + DENIED
    mark = nginx.mark()
    plain = run_in_cgroup(governed, python_client, nginx.plain_port, paths, None, None)
    port = nginx.ports[case]
    tls = run_in_cgroup(governed, python_client, port, paths, str(nginx.cert), CASES[case][2].value)
    assert [outcome(r) for r in plain] == ["served"] * len(ALLOWED) + ["refused"] * len(DENIED)
    assert [outcome(r) for r in tls] == [outcome(r) for r in plain], (tls, counters())
    # Every connection completed its handshake (the denied ones were refused at the request).
    assert all("cipher" in r for r in tls), tls
    assert all(r.get("ktls_tx") for r in tls if "error" not in r), tls
    assert nginx.paths_on(port, mark) == ALLOWED, "denied requests must never reach nginx"
    c = counters()
    assert c.rules[0].requests == 2 and c.rules[1].requests == 2, c  # plaintext and TLS alike
    # /admin by the default, /public/../admin before any rule (a dot segment is ambiguous):
    # on the plaintext and the kTLS connections alike.
    assert sum(n.requests for n in c.refused.values()) == 2 * len(DENIED), c
    assert set(c.refused) <= {"default", "ambiguous-path"}, c  # no TLS refusal
    assert c.default.requests == 2, c


def test_tls_handshake_on_a_plaintext_policy_is_refused(
    nginx: Nginx, cgroup: Path, tmp_path: Path, run_in_cgroup, ktls_kernel
) -> None:
    """Without `tls` the ClientHello is refused (tls-not-declared): nothing reaches nginx."""
    load(policy_object(nginx, tmp_path, ""), cgroup).close()
    try:
        port, mark = nginx.ports["tls12-aes128"], nginx.mark()
        (rec,) = run_in_cgroup(cgroup, python_client, port, ["/ok"], str(nginx.cert), 0x0303)
        assert "cipher" not in rec and "Errno 13" in rec.get("error", ""), rec
        assert nginx.paths_on(port, mark) == []
        assert counters().refused["tls-not-declared"].requests == 1
    finally:
        unload(POLICY_NAME)


def openssl_s_client(port: int, path: str, conf: str, tls: str) -> tuple[int, str]:
    env = dict(os.environ, OPENSSL_CONF=conf)
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         f"-{tls}", "-ign_eof"],
        input=request(path), capture_output=True, env=env, timeout=30,
    )  # fmt: skip
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def check_s_client(
    case: str,
    nginx: Nginx,
    governed: Path,
    run_in_cgroup,
    tmp_path: Path,
    counters: Callable[[], rc.PolicyCounters],
) -> None:
    """`openssl s_client` with kTLS from the governed cgroup, a connection per path: the
    allowed paths get their 200 over kTLS, the denied ones fail with EACCES (errno=13) and
    never reach nginx (`counters` is shown when they do)."""
    conf = tmp_path / "openssl-ktls.cnf"
    conf.write_text(OPENSSL_KTLS_CONF)
    port, tls = nginx.ports[case], "tls1_2" if case.startswith("tls12") else "tls1_3"
    mark = nginx.mark()
    outs = {
        p: run_in_cgroup(governed, openssl_s_client, port, p, str(conf), tls)
        for p in ALLOWED + DENIED
    }
    for p in ALLOWED:
        assert "Using Kernel TLS for sending" in outs[p][1], outs[p][1][-2000:]
        assert "HTTP/1.1 200 OK" in outs[p][1]
    for p in DENIED:
        assert "errno=13" in outs[p][1] and "HTTP/1.1 200" not in outs[p][1], outs[p][1][-2000:]
    assert nginx.paths_on(port, mark) == ALLOWED, counters()


@pytest.mark.parametrize("case", ["tls12-aes256", "tls13-aes128"])
def test_openssl_s_client_ktls_matches_plaintext(
    case: str, nginx: Nginx, governed: Path, run_in_cgroup, tmp_path: Path, require_ktls_sockmap
) -> None:
    check_s_client(case, nginx, governed, run_in_cgroup, tmp_path, counters)


def curl(url: str, cafile: str) -> tuple[int, str]:
    proc = subprocess.run(
        ["curl", "-sS", "--max-time", "15", "--cacert", cafile, url],
        capture_output=True, timeout=30,
    )  # fmt: skip
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def test_curl_userspace_tls_is_refused_or_passed_as_the_policy_says(
    nginx: Nginx, governed: Path, tmp_path: Path, run_in_cgroup, ktls_kernel
) -> None:
    """curl does TLS in user space: after its handshake the program sees only ciphertext.

    `tls` (userspace deny) refuses its first request (tls-userspace), so it never reaches nginx;
    the same request in plaintext is served, and the same TLS request from outside the governed
    cgroup too. `tls userspace allow`, hot-reloaded, lets it pass unjudged.
    """
    port, mark = nginx.ports["tls13-aes128"], nginx.mark()
    url = f"https://localhost:{port}/ok"
    status, out = run_in_cgroup(governed, curl, url, str(nginx.cert))
    assert status != 0, out
    assert nginx.paths_on(port, mark) == [], "a request must never reach nginx"
    assert counters().refused["tls-userspace"].requests == 1

    status, out = run_in_cgroup(governed, curl, f"http://127.0.0.1:{nginx.plain_port}/ok", "-")
    assert (status, out) == (0, "ok\n")
    status, out = curl(url, str(nginx.cert))  # from the test process: not governed
    assert (status, out) == (0, "ok\n")
    assert nginx.paths_on(port, mark) == ["/ok"]

    reload(POLICY_NAME, policy_object(nginx, tmp_path, "tls userspace allow"), check_tls=False)
    status, out = run_in_cgroup(governed, curl, f"https://localhost:{port}/admin", str(nginx.cert))
    assert (status, out) == (0, "ok\n"), out  # unjudged: even a path the policy denies
    assert nginx.paths_on(port, mark) == ["/ok", "/admin"]
    assert counters().would_refuse["tls-userspace"].requests == 1


def test_rejecting_kernel_fails_closed_for_ktls_clients(
    nginx: Nginx, governed: Path, run_in_cgroup, require_rejection
) -> None:
    """Where TLS_TX is refused on sockhash sockets, OpenSSL stays in user space: refused too
    (`load` refuses a `tls` policy there; this one was loaded with check_tls=False)."""
    port, mark = nginx.ports["tls13-aes256"], nginx.mark()
    recs = run_in_cgroup(governed, python_client, port, ALLOWED, str(nginx.cert), 0x0304)
    assert [outcome(r) for r in recs] == ["refused"] * len(ALLOWED), recs
    assert not any(r.get("ktls_tx") for r in recs)
    assert nginx.paths_on(port, mark) == []
    assert counters().refused["tls-userspace"].requests == len(ALLOWED)
