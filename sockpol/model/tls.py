"""The TLS handshake as the sk_msg program sees it, before any HTTP (docs/ktls.md).

A TLS library sets the kTLS ULP when it gets the socket, but TLS_TX only once the handshake has
made the keys: everything the client sends before that crosses the program as TLS records, and
everything after it as the plaintext of the records the kernel is about to encrypt. On a port
whose policy says `tls`, the program therefore walks the client's records one per run (the
verdict's apply_bytes ends at the record, the kernel runs the program again on what follows)
and passes those a handshake needs, until the first byte that cannot start a record: from then
on the connection is HTTP, judged as on a plaintext port.

Which records a client sends, in order (C: client hello, X: key exchange, CCS: change cipher
spec, F: finished; [..] encrypted in user space):

- TLS 1.2: C, X, CCS, [F] as a *handshake* record, then application data; a kTLS client sends
  F through kTLS (OpenSSL turns TLS_TX on when its write key changes, right after the CCS), so
  the program sees F's plaintext: 16 bytes, `14 00 00 0c` (handshake type Finished, length 12)
  and the verify_data, as one run (a record of its own, its type set by a cmsg);
- TLS 1.3: C, (CCS), [F] as an *application-data* record, then application data;
- TLS 1.3 after a HelloRetryRequest: C, (CCS), C, [F].

So a handshake record after a change cipher spec that is not a ClientHello, or that 16-byte
plaintext right after a change cipher spec, is the TLS 1.2 Finished; an application-data record
is the TLS 1.3 Finished if it is the first one and no TLS 1.2 Finished came before it. (A TLS
1.3 kTLS client's Finished is encrypted in user space: OpenSSL turns TLS_TX on only with the
application key, after it.) Past either Finished the handshake is over: an application-data
record then is a request encrypted in user space (no kTLS), which the program cannot read —
`tls userspace deny` refuses it, `tls userspace allow` lets the connection pass unjudged.
Limits (fail closed): a ClientHello split over records, TLS 1.3 client certificates (more than
one encrypted handshake record) and 0-RTT early data are refused.

`step()` is the decision, used by the reference interpreter (interp.py) and the tables' mirror
(codegen/simulate.py); codegen/emit.py's `tls_phase` is the same in the kernel. Refusal reasons
are the slugs of contract.Reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from sockpol.contract import (  # noqa: F401 -- CONN_* and RESUME_TLS_PASS re-exported
    CONN_CCS,
    CONN_DONE,
    CONN_HELLO,
    CONN_HTTP,
    CONN_TLS12_DONE,
    CONN_TLS13_DONE,
    CONN_TLS_FLAGS,
    REASON_TEXT,
    RESUME_TLS_PASS,
    Reason,
)
from sockpol.dsl.ast import Policy, TlsUserspace


class ContentType(IntEnum):
    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


CLIENT_HELLO, FINISHED = 1, 20  # handshake message types
VERIFY_DATA = 12  # a TLS 1.2 Finished's verify_data (every TLS 1.2 cipher suite)
HEADER = 5  # type, version (2), length (2)
HELLO_HEADER = HEADER + 4  # and the handshake header: type, length (3)
MAX_RECORD = (1 << 14) + 2048  # largest TLSCiphertext.length
MAX_ALERT_AFTER_HANDSHAKE = 64  # an encrypted alert (close_notify) is 2 bytes plus overhead

# The policy's `tls` statement, as the program's config value.
TLS_NONE, TLS_USERSPACE_DENY, TLS_USERSPACE_ALLOW = 0, 1, 2

# The connection word's TLS bits (16..23) and RESUME_TLS_PASS are the contract's
# (contract.CONN_*), imported above.

BAD_RECORD = Reason.TLS_BAD_RECORD.slug
NOT_DECLARED = Reason.TLS_NOT_DECLARED.slug
USERSPACE = Reason.TLS_USERSPACE.slug
REFUSALS = (NOT_DECLARED, USERSPACE, BAD_RECORD)
DETAIL = {
    r.slug: REASON_TEXT[r]
    for r in (Reason.TLS_NOT_DECLARED, Reason.TLS_USERSPACE, Reason.TLS_BAD_RECORD)
}


class StepKind(IntEnum):
    HTTP = 0  # not a record: the connection is HTTP from these bytes on
    PASS = 1  # pass the record (`covered` bytes) and remember `flags`
    CORK = 2  # too few bytes to tell: hold them until `covered` bytes
    REFUSE = 3  # refuse for `reason`
    USERSPACE_ALLOW = 4  # pass this and everything after it, unjudged


def policy_mode(policy: Policy) -> int:
    """The config value of a policy's `tls` statement."""
    if policy.tls is None:
        return TLS_NONE
    return TLS_USERSPACE_ALLOW if policy.tls.userspace is TlsUserspace.ALLOW else TLS_USERSPACE_DENY


@dataclass(frozen=True)
class Step:
    action: StepKind
    covered: int = 0
    flags: int = 0  # the connection's TLS flags after this record
    reason: str = ""  # for REFUSE: one of the REFUSALS below


def is_alert_plaintext(data: bytes, size: int) -> bool:
    """A kTLS socket's alert (e.g. close_notify at shutdown), as the program sees it: the
    2-byte plaintext of a record the library sends with a TLS_SET_RECORD_TYPE cmsg."""
    return size == 2 and len(data) >= 2 and data[0] in (1, 2)


def is_client_hello(data: bytes, length: int) -> bool:
    """A record holding one whole ClientHello (the handshake length fills the record)."""
    return (
        data[0] == ContentType.HANDSHAKE
        and data[5] == CLIENT_HELLO
        and int.from_bytes(data[6:9], "big") + 4 == length
    )


def is_ktls_finished(data: bytes, size: int) -> bool:
    """A TLS 1.2 client's Finished sent through kTLS, as the program sees it: the whole message
    is the handshake message, type Finished, length 12, then the verify_data."""
    return size == 4 + VERIFY_DATA and data[:4] == bytes((FINISHED, 0, 0, VERIFY_DATA))


def step(data: bytes, size: int, word: int, tls_mode: int) -> Step:
    """What the program does with a message (its first `len(data)` bytes, of `size`) that
    starts on a connection still in its TLS phase (`word & CONN_HTTP` is 0)."""
    if not data or data[0] not in iter(ContentType):
        return Step(StepKind.HTTP)
    flags = word & CONN_TLS_FLAGS
    if flags & CONN_CCS and not flags & CONN_DONE and is_ktls_finished(data, size):
        # (its first byte, 20, is also the CCS record type: the record checks would refuse it)
        return Step(StepKind.PASS, covered=size, flags=flags | CONN_TLS12_DONE)
    need = HELLO_HEADER if data[0] == ContentType.HANDSHAKE else HEADER
    if len(data) < need:
        if size < need:
            return Step(StepKind.CORK, covered=need)
        return Step(StepKind.REFUSE, reason=BAD_RECORD)  # (no window is this small)
    length = int.from_bytes(data[3:5], "big")
    if data[1] != 3 or data[2] > 4 or not 1 <= length <= MAX_RECORD:
        return Step(StepKind.REFUSE, reason=BAD_RECORD)
    if tls_mode == TLS_NONE:
        return Step(StepKind.REFUSE, reason=NOT_DECLARED)
    kind = data[0]
    hello = kind == ContentType.HANDSHAKE and is_client_hello(data, length)
    bad = Step(StepKind.REFUSE, reason=BAD_RECORD)
    if not flags & CONN_HELLO:
        if not hello:
            return bad
        flags |= CONN_HELLO
    elif kind == ContentType.CHANGE_CIPHER_SPEC:
        if flags & CONN_DONE:
            return bad
        flags |= CONN_CCS
    elif kind == ContentType.ALERT:
        if flags & CONN_DONE and length > MAX_ALERT_AFTER_HANDSHAKE:
            return bad
    elif kind == ContentType.HANDSHAKE:
        if flags & CONN_DONE:
            return bad
        if flags & CONN_CCS and not hello:
            flags |= CONN_TLS12_DONE
    elif flags & CONN_DONE:  # application data after the handshake: encrypted in user space
        if tls_mode == TLS_USERSPACE_ALLOW:
            return Step(StepKind.USERSPACE_ALLOW, flags=flags)
        return Step(StepKind.REFUSE, reason=USERSPACE)
    else:
        flags |= CONN_TLS13_DONE
    return Step(StepKind.PASS, covered=HEADER + length, flags=flags)


__all__ = [
    "CONN_HTTP",
    "CONN_TLS_FLAGS",
    "RESUME_TLS_PASS",
    "TLS_NONE",
    "TLS_USERSPACE_ALLOW",
    "TLS_USERSPACE_DENY",
    "StepKind",
    "Step",
    "is_alert_plaintext",
    "policy_mode",
    "step",
]
