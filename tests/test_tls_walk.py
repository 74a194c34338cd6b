"""The TLS handshake walk (sockpol/dsl/tls.py) fed the bytes real OpenSSL clients send.

No kernel and no sockets: Python's `ssl` runs a client and a server in memory (`MemoryBIO` +
`SSLContext.wrap_bio`), flight by flight. Whatever the client's outgoing BIO holds after a
`do_handshake()` step is one send() on the client's socket, as OpenSSL writes a flight (it
buffers a flight's records and flushes them in one write). Each connection is fed to both models
of the kernel program: the reference interpreter (`interp.Connection`), held run by run to the
tables' mirror (`simulate.run`, the per-connection word carried from run to run), and the
tables' own `simulate.TablesConnection`.

What a kTLS client sends differs from these flights only after the keys exist, and is built
from them here (`ktls_sends`): OpenSSL turns TLS_TX on when its write key becomes the
application key, so
- TLS 1.3: the flights as they are (the Finished is encrypted in user space, under the
  handshake key), then the requests in plaintext;
- TLS 1.2: the write key changes right after the ChangeCipherSpec, so the flight ends there and
  the Finished goes through kTLS: the program sees its 16-byte plaintext (handshake type 20,
  length 12, verify_data), then the requests in plaintext.

The TLS 1.3 AES-128-GCM handshake needs the cipher suite set, which Python 3.11's `ssl` cannot
do; it is captured in a child process whose OPENSSL_CONF says `Ciphersuites`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import ssl
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tables_observer import held_to_tables

from sockpol.codegen import simulate
from sockpol.codegen.lower import MatcherIR
from sockpol.compiler import compile_source
from sockpol.contract import RESUME_UNJUDGED, Reason
from sockpol.dsl import load_source
from sockpol.dsl.ast import Policy
from sockpol.model import interp, tls
from sockpol.telemetry import (
    MODE_DRY_RUN,
    MODE_ENFORCE,
    SLOT_WOULD_REFUSE,
)

V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
CCS, HANDSHAKE, APPLICATION_DATA = 20, 22, 23
EXAMPLES = int(os.environ.get("SOCKPOL_DIFF_EXAMPLES", "0")) or None  # as tests/test_interp.py

# -- the clients ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    version: ssl.TLSVersion
    cipher: str  # what the handshake must negotiate
    ciphers12: str | None = None  # TLS 1.2 cipher string (set_ciphers), client and server
    suites13: str | None = None  # TLS 1.3 cipher suites: through OPENSSL_CONF, in a child process
    resume: bool = False  # a second connection resuming the first one's session
    server_curve: str | None = None  # the server's only group (a HelloRetryRequest in TLS 1.3)
    client_cert: bool = False  # the server requires a client certificate


AES128_12, AES256_12 = "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384"
AES128_13, AES256_13 = "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384"
SCENARIOS = {
    "tls12-aes128": Scenario(V12, AES128_12, ciphers12=AES128_12),
    "tls12-aes256": Scenario(V12, AES256_12, ciphers12=AES256_12),
    "tls13-aes128": Scenario(V13, AES128_13, suites13=AES128_13),
    "tls13-aes256": Scenario(V13, AES256_13),  # OpenSSL's first TLS 1.3 suite
    "tls12-resumed": Scenario(V12, AES128_12, ciphers12=AES128_12, resume=True),
    "tls13-resumed": Scenario(V13, AES256_13, resume=True),
    "tls13-hello-retry": Scenario(V13, AES256_13, server_curve="secp384r1"),
    "tls12-client-cert": Scenario(V12, AES256_12, ciphers12=AES256_12, client_cert=True),
    "tls13-client-cert": Scenario(V13, AES256_13, client_cert=True),
}
# Handshakes the walk passes whole (a TLS 1.3 client certificate is a documented limit).
HANDSHAKES = [name for name in SCENARIOS if name != "tls13-client-cert"]
CIPHERS = ["tls12-aes128", "tls12-aes256", "tls13-aes128", "tls13-aes256"]

REQUESTS = (
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /admin HTTP/1.1\r\nHost: localhost\r\n\r\n",
)


@dataclass(frozen=True)
class Capture:
    """What one client connection sent."""

    name: str
    version: str
    cipher: str
    flights: tuple[bytes, ...]  # the handshake, one send per flight
    requests: tuple[bytes, ...]  # REQUESTS, each written and read out as one record
    finished: bytes  # TLS 1.2 full handshake: the client's Finished verify_data (tls-unique)
    resumed: bool

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "version": self.version,
                "cipher": self.cipher,
                "flights": [f.hex() for f in self.flights],
                "requests": [r.hex() for r in self.requests],
                "finished": self.finished.hex(),
                "resumed": self.resumed,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Capture:
        d = json.loads(text)
        return cls(
            d["name"], d["version"], d["cipher"],
            tuple(bytes.fromhex(f) for f in d["flights"]),
            tuple(bytes.fromhex(r) for r in d["requests"]),
            bytes.fromhex(d["finished"]), d["resumed"],
        )  # fmt: skip

    @property
    def handshake(self) -> bytes:
        return b"".join(self.flights)


def records(data: bytes) -> list[tuple[int, bytes]]:
    """The TLS records of `data` (whole records only): (content type, record with its header)."""
    out, i = [], 0
    while i < len(data):
        end = i + tls.HEADER + int.from_bytes(data[i + 3 : i + 5], "big")
        assert end <= len(data), "a flight ends inside a record"
        out.append((data[i], data[i:end]))
        i = end
    return out


def _contexts(s: Scenario, certdir: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = str(certdir / "cert.pem"), str(certdir / "key.pem")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(cert)
    client.minimum_version = client.maximum_version = s.version
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    if s.ciphers12:
        client.set_ciphers(s.ciphers12)
        server.set_ciphers(s.ciphers12)
    if s.server_curve:
        server.set_ecdh_curve(s.server_curve)  # OpenSSL 3: the server's group list is this one
    if s.client_cert:
        server.verify_mode = ssl.CERT_REQUIRED
        server.load_verify_locations(cert)
        client.load_cert_chain(cert, key)
    return client, server


def _connect(
    client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLObject, Capture]:
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost", session=session)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    flights: list[bytes] = []
    client_done = server_done = False
    for _ in range(10):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        flight = c_out.read()
        if flight:
            flights.append(flight)
            s_in.write(flight)
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        reply = s_out.read()
        c_in.write(reply)
        if client_done and server_done and not flight and not reply:
            break
    else:
        raise AssertionError("the in-memory handshake did not finish")
    try:  # the client reads what the server sent last (TLS 1.3 session tickets)
        client.read(1)
    except ssl.SSLWantReadError:
        pass
    assert c_out.pending == 0, "the client answered the server's last flight"
    requests = []
    for request in REQUESTS:
        client.write(request)
        record = c_out.read()
        s_in.write(record)
        assert server.read(4096) == request  # the server decrypts what the client sent
        requests.append(record)
    finished = b""
    if client.version() == "TLSv1.2" and not client.session_reused:
        finished = client.get_channel_binding("tls-unique") or b""  # the client's Finished
    cipher = client.cipher()
    assert cipher is not None
    capture = Capture(
        "", client.version() or "", cipher[0], tuple(flights), tuple(requests), finished,
        client.session_reused,
    )  # fmt: skip
    return client, capture


def capture_here(name: str, certdir: Path) -> Capture:
    """The scenario's client connection, in this process."""
    s = SCENARIOS[name]
    client_ctx, server_ctx = _contexts(s, certdir)
    client, capture = _connect(client_ctx, server_ctx)
    if s.resume:
        _, capture = _connect(client_ctx, server_ctx, session=client.session)
        assert capture.resumed, "the server did not resume the session"
    return dataclasses.replace(capture, name=name)


OPENSSL_SUITES_CONF = """\
openssl_conf = openssl_init
[openssl_init]
ssl_conf = ssl_sect
[ssl_sect]
system_default = system_default_sect
[system_default_sect]
Ciphersuites = {suites}
"""


def capture_in_child(name: str, certdir: Path) -> Capture:
    """The scenario in a child process whose OpenSSL reads the scenario's cipher suites from
    its configuration (OpenSSL reads OPENSSL_CONF once, when the process starts it)."""
    conf = certdir / f"{name}.cnf"
    conf.write_text(OPENSSL_SUITES_CONF.format(suites=SCENARIOS[name].suites13))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_tls_walk as t; "
        "from pathlib import Path; print(t.capture_here(sys.argv[2], Path(sys.argv[3])).to_json())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), name, str(certdir)],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, OPENSSL_CONF=str(conf), PYTHONDONTWRITEBYTECODE="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return Capture.from_json(proc.stdout)


@pytest.fixture(scope="module")
def certdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command makes the test certificate")
    d = tmp_path_factory.mktemp("tls-walk")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    return d


@pytest.fixture(scope="module")
def captures(certdir: Path):
    """name -> Capture, each captured once per module."""

    @cache
    def get(name: str) -> Capture:
        s = SCENARIOS[name]
        capture = capture_in_child(name, certdir) if s.suites13 else capture_here(name, certdir)
        assert capture.version == s.version.name.replace("_", "."), capture
        assert capture.cipher == s.cipher, capture
        return capture

    return get


def ktls_sends(c: Capture) -> list[bytes]:
    """The handshake sends of the same client with kTLS (the module docstring says why)."""
    if c.version == "TLSv1.3":
        return list(c.flights)
    *first, last = c.flights
    (*before, (kind, _finished)) = records(last)
    assert kind == HANDSHAKE and before[-1][0] == CCS
    verify_data = c.finished or bytes(range(12))  # a resumed client's own is not exposed
    assert len(verify_data) == 12
    return [*first, b"".join(r for _, r in before), b"\x14\x00\x00\x0c" + verify_data]


# -- the policies and the two models ---------------------------------------------------------------

RULES = ("allow GET /ok", "deny GET /admin")


@cache
def compile_policy(tls_line: str | None, mode: str = "enforce") -> tuple[Policy, MatcherIR]:
    lines = ["port 443", "default deny", f"mode {mode}"]
    lines += [tls_line] if tls_line else []
    text = "policy t {\n" + "".join(f"    {x}\n" for x in [*lines, *RULES]) + "}\n"
    (compiled,), _ = compile_source(text, "t.pol")
    (policy,) = load_source(text, "t.pol")[0].policies
    return policy, compiled.matcher


@dataclass
class Both:
    """One client connection through both models at once, send by send."""

    policy: Policy
    ir: MatcherIR
    mode: int = MODE_ENFORCE

    def __post_init__(self) -> None:
        self.interp = interp.Connection(
            self.policy, observe=held_to_tables(self.ir, self.mode, tls_state=True)
        )
        self.tables = simulate.TablesConnection(self.ir, mode=self.mode)
        self.sent = bytearray()
        self.results: list[tuple[int | None, bool]] = []  # (interp's send() count, tables' ok)

    def send(self, data: bytes) -> tuple[int | None, bool]:
        returned = self.interp.send(data).returned
        self.tables.send(data)
        result = (returned, not self.tables.refused)  # (interp's send() count, tables' ok)
        self.sent += data
        self.results.append(result)
        assert bytes(self.interp.delivered) == bytes(self.tables.delivered), len(self.results)
        assert self.interp.refused == self.tables.refused, len(self.results)
        # One stream model (model/stream.py) around both judges: send() returns the same too.
        assert self.interp.sends[-1].returned == self.tables.sends[-1].returned, len(self.results)
        assert (result[0] is None) <= (not result[1])  # a failed send is a refused one
        return result

    def passes(self, data: bytes) -> None:
        """`data` is one send that both models pass whole."""
        before = len(self.delivered)
        assert self.send(data) == (len(data), True), self.outcome
        assert self.delivered == bytes(self.sent), self.outcome
        assert len(self.delivered) == before + len(data)

    @property
    def delivered(self) -> bytes:
        return bytes(self.tables.delivered)

    @property
    def refused(self) -> bool:
        return self.tables.refused

    @property
    def reason(self) -> str:
        """The last refusal's (or would-be refusal's) reason, the same in both models."""
        want = self.tables.verdicts[-1].reason if self.tables.verdicts else Reason.NONE
        got = self.interp.verdicts[-1].reason if self.interp.verdicts else "none"
        assert got == want.slug or not self.interp.verdicts, (got, want)
        return want.slug

    @property
    def outcome(self) -> tuple[bytes, bool, list[str]]:
        """What a split of the sends must not change."""
        return self.delivered, self.refused, [v.reason for v in self.interp.verdicts]


def run_sends(tls_line: str | None, sends: list[bytes], mode: str = "enforce") -> Both:
    policy, ir = compile_policy(tls_line, mode)
    both = Both(policy, ir, MODE_DRY_RUN if mode == "dry-run" else MODE_ENFORCE)
    for data in sends:
        both.send(data)
    return both


def handshake(tls_line: str, sends: list[bytes]) -> Both:
    """A connection whose handshake sends all pass whole, in both models."""
    policy, ir = compile_policy(tls_line)
    both = Both(policy, ir)
    for data in sends:
        both.passes(data)
    assert not both.interp.verdicts, "a handshake record was judged"
    return both


# -- the captures are what the walk expects -------------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_clients_send_what_tls_py_describes(name, captures):
    """The record sequences of tls.py's docstring, from real OpenSSL clients."""
    c = captures(name)
    kinds = [[kind for kind, _ in records(flight)] for flight in c.flights]
    first = records(c.flights[0])
    assert len(first) == 1 and tls.is_client_hello(first[0][1], len(first[0][1]) - tls.HEADER)
    assert all(kind == APPLICATION_DATA for r in c.requests for kind, _ in records(r))
    expected = {
        "tls12-aes128": [[HANDSHAKE], [HANDSHAKE, CCS, HANDSHAKE]],  # C, X CCS [F]
        "tls12-aes256": [[HANDSHAKE], [HANDSHAKE, CCS, HANDSHAKE]],
        "tls13-aes128": [[HANDSHAKE], [CCS, APPLICATION_DATA]],  # C, CCS [F]
        "tls13-aes256": [[HANDSHAKE], [CCS, APPLICATION_DATA]],
        "tls12-resumed": [[HANDSHAKE], [CCS, HANDSHAKE]],  # C, CCS [F]
        "tls13-resumed": [[HANDSHAKE], [CCS, APPLICATION_DATA]],
        "tls13-hello-retry": [[HANDSHAKE], [CCS, HANDSHAKE], [APPLICATION_DATA]],  # C, CCS C, [F]
        # C, Certificate X CertificateVerify CCS [F]
        "tls12-client-cert": [[HANDSHAKE], [HANDSHAKE] * 3 + [CCS, HANDSHAKE]],
        # C, CCS [Certificate] [CertificateVerify] [F]: three encrypted handshake records
        "tls13-client-cert": [[HANDSHAKE], [CCS] + [APPLICATION_DATA] * 3],
    }[name]
    assert kinds == expected
    if name == "tls13-hello-retry":  # the second handshake record is a second ClientHello
        (_, hello) = records(c.flights[1])[1]
        assert tls.is_client_hello(hello, len(hello) - tls.HEADER)


# -- tls / tls userspace deny / tls userspace allow -----------------------------------------------


@pytest.mark.parametrize("tls_line", ["tls", "tls userspace deny"])
@pytest.mark.parametrize("name", HANDSHAKES)
def test_handshake_passes_and_the_first_userspace_request_is_refused(name, tls_line, captures):
    c = captures(name)
    both = handshake(tls_line, list(c.flights))
    # One run per record, each covering its record exactly.
    lengths = [len(r) for flight in c.flights for _, r in records(flight)]
    assert [r.apply_bytes for r in both.tables.verdicts] == lengths
    assert both.send(c.requests[0]) == (None, False)
    assert both.refused and both.reason == "tls-userspace"
    assert both.delivered == c.handshake  # nothing of the request left
    assert both.send(c.requests[1]) == (None, False)  # nor of anything after it
    assert both.delivered == c.handshake


@pytest.mark.parametrize("name", HANDSHAKES)
def test_userspace_allow_passes_the_connection_unjudged(name, captures):
    c = captures(name)
    both = handshake("tls userspace allow", list(c.flights))
    for data in [*c.requests, b"GET /admin HTTP/1.1\r\n\r\n", b"\x16\x03\x03\x00\x01\x00"]:
        both.passes(data)  # from the first application-data record on, nothing is read
    assert not both.interp.verdicts
    slot = SLOT_WOULD_REFUSE + Reason.TLS_USERSPACE
    counted = [n for r in both.tables.verdicts for s, n, _ in r.counts if s == slot]
    assert counted == [1]  # the program counts the connection once, at that record


@pytest.mark.parametrize("name", CIPHERS + ["tls13-hello-retry"])
def test_a_plaintext_policy_refuses_the_client_hello(name, captures):
    c = captures(name)
    both = run_sends(None, list(c.flights))
    assert both.results[0] == (None, False) and both.refused
    assert both.reason == "tls-not-declared" and both.delivered == b""


def test_a_plaintext_policy_in_dry_run_passes_the_handshake_unjudged(captures):
    c = captures("tls13-aes256")
    both = run_sends(None, [*c.flights, *c.requests], mode="dry-run")
    assert not both.refused and both.delivered == both.sent
    # Recorded once (a dry-run event), then every run passes unjudged, only counted.
    assert [v.reason for v in both.interp.verdicts] == ["tls-not-declared"] * 4
    assert [v.event for v in both.interp.verdicts] == [interp.DRY_RUN, None, None, None]
    assert both.tables.verdicts[-1].resume == RESUME_UNJUDGED


# -- a documented limit: TLS 1.3 client certificates ----------------------------------------------


def test_tls13_client_certificate_is_refused_at_its_second_encrypted_record(captures):
    """LIMIT (tls.py: "TLS 1.3 client certificates (more than one encrypted handshake record)
    ... are refused"). A TLS 1.3 client that sends a certificate sends CCS, [Certificate],
    [CertificateVerify], [Finished] in one flight, each an application-data record. The walk
    takes the first of them, [Certificate], for the Finished, and the second for a request
    encrypted in user space: the flight is refused there, reason tls-userspace, with the
    ClientHello, the CCS and the [Certificate] record delivered (a short send), so the
    handshake never completes. A kTLS client fails the same way: these records are all sent
    before TLS_TX."""
    c = captures("tls13-client-cert")
    hello, flight = c.flights
    ccs, certificate, certificate_verify, finished = (r for _, r in records(flight))
    for tls_line in ["tls", "tls userspace deny"]:
        both = run_sends(tls_line, [hello, flight])
        assert both.results == [(len(hello), True), (len(ccs + certificate), False)]
        assert both.refused and both.reason == "tls-userspace"
        assert both.delivered == hello + ccs + certificate


def test_tls13_client_certificate_under_userspace_allow_passes_unjudged(captures):
    """LIMIT, the other side of it: under `tls userspace allow` the same [CertificateVerify]
    record puts the connection into the unjudged pass, so a kTLS client with a client
    certificate then sends its plaintext requests unjudged (a request the rules deny passes)."""
    c = captures("tls13-client-cert")
    both = handshake("tls userspace allow", list(c.flights))
    both.passes(b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n")
    assert not both.interp.verdicts and both.tables.verdicts[-1].resume == tls.RESUME_TLS_PASS


# -- kTLS clients: plaintext after the handshake --------------------------------------------------


@pytest.mark.parametrize(
    ("request_line", "allowed", "reason"),
    [("GET /ok", True, "none"), ("GET /admin", False, "rule"), ("POST /ok", False, "default")],
)
@pytest.mark.parametrize("name", HANDSHAKES)
def test_ktls_plaintext_after_the_handshake_is_judged_as_http(
    name, request_line, allowed, reason, captures
):
    c = captures(name)
    request = f"{request_line} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    for tls_line in ["tls", "tls userspace allow"]:
        both = handshake(tls_line, ktls_sends(c))
        both.send(request)
        assert both.refused is not allowed
        assert both.reason == reason and len(both.interp.verdicts) == 1
        assert both.delivered == (both.sent if allowed else bytes(both.sent[: -len(request)]))
        if allowed:  # and the connection goes on as HTTP
            both.passes(request)
            assert both.send(b"GET /admin HTTP/1.1\r\n\r\n") == (None, False)
            assert both.reason == "rule"


@pytest.mark.parametrize("name", HANDSHAKES)
def test_ktls_alert_plaintext_passes(name, captures):
    """close_notify through kTLS: the program sees its 2-byte plaintext, right after the
    handshake or after requests."""
    c = captures(name)
    both = handshake("tls", ktls_sends(c))
    both.passes(b"\x01\x00")
    both.passes(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    both.passes(b"\x01\x00")
    assert both.send(b"GET /admin HTTP/1.1\r\n\r\n") == (None, False) and both.reason == "rule"


@pytest.mark.parametrize("name", ["tls12-aes128", "tls12-resumed", "tls12-client-cert"])
def test_ktls_tls12_finished_plaintext_ends_the_handshake(name, captures):
    """A TLS 1.2 kTLS client's Finished is the first record the kernel encrypts: the program
    sees `14 00 00 0c` and the verify_data. It passes only right after a ChangeCipherSpec, as
    a whole 16-byte message; after it, application data is a user-space request."""
    c = captures(name)
    *before, finished = ktls_sends(c)
    both = handshake("tls", [*before, finished])
    assert both.send(c.requests[0]) == (None, False) and both.reason == "tls-userspace"
    for bad in [finished + b"GET", finished[:-1], finished[:3] + b"\x0d" + finished[4:]]:
        both = handshake("tls", before)
        both.send(bad)
        assert both.refused and both.reason == "tls-bad-record", bad
    # Not before the ChangeCipherSpec, and not a second time.
    assert run_sends("tls", [c.flights[0], finished]).reason == "tls-bad-record"
    both = handshake("tls", [*before, finished])
    assert both.send(finished) == (None, False) and both.reason == "tls-bad-record"


# -- cut anywhere ---------------------------------------------------------------------------------


def cuts(data: bytes) -> st.SearchStrategy[list[bytes]]:
    """`data` as 1 to 3 sends, cut at arbitrary offsets."""

    def pieces(offsets: list[int]) -> list[bytes]:
        ends = [0, *sorted(offsets), len(data)]
        return [data[i:j] for i, j in zip(ends, ends[1:], strict=False)]

    return st.lists(st.integers(1, len(data) - 1), max_size=2, unique=True).map(pieces)


KTLS_REQUESTS = [b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /admin HTTP/1.1\r\n\r\n"]
ENDINGS = {
    # (policy, the sends after the handshake flights)
    "userspace-deny": ("tls", lambda c: list(c.requests)),
    "userspace-allow": ("tls userspace allow", lambda c: list(c.requests)),
    "plaintext-policy": (None, lambda c: list(c.requests)),
    "ktls": ("tls", lambda c: list(KTLS_REQUESTS)),
}


def split_sends(c: Capture, ending: str) -> tuple[list[bytes], list[bytes]]:
    """(the sends the TCP path carries, which may be cut; what follows them, kept whole)."""
    after = ENDINGS[ending][1](c)
    if ending != "ktls":
        return list(c.flights), after
    sends = ktls_sends(c)
    if c.version == "TLSv1.2":  # the Finished is a kTLS record: one run, never cut
        return sends[:-1], [sends[-1], *after]
    return sends, after


@settings(
    max_examples=EXAMPLES or 30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("name", SCENARIOS)
@given(data=st.data())
def test_handshake_sends_cut_anywhere_are_walked_the_same(name, ending, captures, data):
    """Records are counted across sends (the bytes still to come, in the socket storage) and a
    record header cut short is held by a cork: cutting the flights changes nothing."""
    c = captures(name)
    tls_line = ENDINGS[ending][0]
    flights, after = split_sends(c, ending)
    whole = run_sends(tls_line, flights + after)
    cut = [piece for flight in flights for piece in data.draw(cuts(flight), label="flight")]
    pieces = run_sends(tls_line, cut + after)
    assert pieces.outcome == whole.outcome
    if tls_line is not None:
        tables = [r for r in pieces.tables.verdicts if r.cork_bytes]
        assert all(r.cork_bytes in (tls.HEADER, tls.HELLO_HEADER) for r in tables)


def test_a_cut_header_is_held_by_a_cork(captures):
    c = captures("tls12-aes128")
    hello, flight = c.flights
    policy, ir = compile_policy("tls")
    both = Both(policy, ir)
    assert both.send(hello[:3]) == (3, True)  # send() counts held bytes as sent
    assert both.delivered == b"" and both.interp.held == hello[:3]
    assert both.tables.verdicts[-1].cork_bytes == tls.HELLO_HEADER
    assert both.send(hello[3:8]) == (5, True)  # 8 bytes: still short of the handshake header
    assert both.delivered == b"" and len(both.tables.verdicts) == 1  # (no run yet)
    both.send(hello[8:] + flight[:2])  # the ClientHello, and the next header cut short
    # (the next record is a handshake record: held until its handshake header is there too)
    assert both.delivered == hello and both.tables.verdicts[-1].cork_bytes == tls.HELLO_HEADER
    both.send(flight[2:40])
    both.send(flight[40:])
    assert both.delivered == hello + flight and not both.refused
