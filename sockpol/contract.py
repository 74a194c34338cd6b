"""The contract between the compiler, the kernel program it emits, and the runtime that loads it.

Every number and name that more than one of them must agree on is defined here and nowhere else:
what the program and its maps are called, the kernel's own constants (map types, context
offsets, flags, system call numbers per architecture), the limits the program enforces (which the
reference interpreter enforces too), the reasons a request is refused with their slugs and texts,
and the per-connection state words. The modules that use them import them from here; this
module imports nothing of sockpol, so any layer may depend on it (docs/design.md, "Layers").
"""

from __future__ import annotations

import os
from enum import IntEnum

# --- names in the object ------------------------------------------------------------------------

MSG_PROGRAM = "sockpol_msg"  # section sk_msg
SKB_PROGRAM = "sockpol_skb"  # section sk_skb/stream_verdict: an ingress policy's verdict program
SOCKOPS_PROGRAM = "sockpol_sockops"  # section sockops
SOCK_MAP = "sockpol_socks"  # the sockhash the programs are attached to
CONN_MAP = "sockpol_conn"  # per-connection socket storage (stream state and a run's work area)
TABLES_SYMBOL = "sockpol_tables"  # the policy's tables in .data (two slots, generation, serial)
NEXT_MAP = "sockpol_next"  # PROG_ARRAY[1]: the newest version's sk_msg program (reload, issue 18)
# Maps every version of a loaded policy shares, so that a replacement takes over the connections
# that are open (their socket storage, the program array that sends them to the new program, the
# control word with the mode and the serial, the events). Counters are per version.
SHARED_MAPS = (SOCK_MAP, CONN_MAP, NEXT_MAP)
SOCK_MAP_ENTRIES = 65536
# The LSM backend (codegen/lsm.py, docs/design.md "The LSM backend"): a sleepable BPF LSM program
# on socket_sendmsg, per-task storage for a run's work area and its copy of the head.
LSM_PROGRAM = "sockpol_lsm"  # section lsm.s/socket_sendmsg
LSM_SECTION = "lsm.s/socket_sendmsg"
WORK_MAP = "sockpol_work"  # task storage: the work area and the head copied from the caller
LSM_SHARED_MAPS = (CONN_MAP, WORK_MAP)  # what a replacement of an LSM object shares
# The LSM backend's socket storage: the word, left, the cookie at LSM_CONN_KEY (nonzero: governed),
# the connection's addresses and ports at LSM_CONN_MD laid out like struct sk_msg_md.
LSM_CONN_KEY, LSM_CONN_MD = 16, 24
LSM_WINDOW = 512  # head bytes the LSM program copies and scans at a time (lsm.py: why)
BACKENDS = ("sockmap", "lsm")

# --- the kernel's constants (include/uapi/linux/bpf.h; the same on every architecture) ----------

BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_SOCKHASH = 18
BPF_MAP_TYPE_SK_STORAGE = 24
BPF_MAP_TYPE_RINGBUF = 27
BPF_MAP_TYPE_TASK_STORAGE = 29
BPF_NOEXIST = 1
BPF_F_NO_PREALLOC = 1
BPF_SK_STORAGE_GET_F_CREATE = 1
BPF_F_INGRESS = 1  # bpf_msg_redirect_hash: into the socket's receive queue
BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB = 4
BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB = 5
BPF_SOCK_OPS_STATE_CB = 10  # args[0] old state, args[1] new state
BPF_SOCK_OPS_STATE_CB_FLAG = 4
TCP_CLOSE = 7
BPF_MAP_TYPE_HASH = 1
BPF_ANY = 0
BPF_PROG_TYPE_SK_SKB = 14
BPF_SK_SKB_STREAM_VERDICT = 5
BPF_PROG_TYPE_SOCK_OPS = 13
BPF_PROG_TYPE_SK_MSG = 16
BPF_PROG_TYPE_LSM = 29
BPF_LSM_MAC = 27  # attach type of an LSM program
EACCES = 13
BPF_CGROUP_SOCK_OPS = 3  # attach types
BPF_SK_MSG_VERDICT = 7
BPF_FUNC_LOOP = 181  # the bpf_loop helper (5.17+), which the scanner cannot do without
SK_DROP, SK_PASS = 0, 1
AF_INET, AF_INET6 = 2, 10

# struct sk_msg_md field offsets.
MSG_DATA, MSG_DATA_END, MSG_FAMILY = 0, 8, 16
MSG_REMOTE_IP4, MSG_LOCAL_IP4, MSG_REMOTE_IP6, MSG_LOCAL_IP6 = 20, 24, 28, 44
MSG_REMOTE_PORT, MSG_LOCAL_PORT, MSG_SIZE, MSG_SK = 60, 64, 68, 72
# struct bpf_sock_ops field offsets.
OPS_OP, OPS_FAMILY, OPS_REMOTE_PORT = 0, 20, 64
OPS_SK = 184  # __bpf_md_ptr(struct bpf_sock *, sk), 5.10+
OPS_ARGS, OPS_LOCAL_PORT = 4, 68  # args[4] (u32 each); local_port in host order
# struct __sk_buff field offsets (the sk_skb program's context; data and data_end are u32 fields
# the verifier turns into packet pointers).
SKB_LEN, SKB_DATA, SKB_DATA_END, SKB_FAMILY = 0, 76, 80, 88
SKB_REMOTE_IP4, SKB_LOCAL_IP4, SKB_REMOTE_IP6, SKB_LOCAL_IP6 = 92, 96, 100, 116
SKB_REMOTE_PORT, SKB_LOCAL_PORT = 132, 136

# membarrier(2): its system call number differs per architecture (asm-generic: 283).
MEMBARRIER_CMD_GLOBAL = 1  # synchronize_rcu(): an RCU grace period
MEMBARRIER_CMD_GLOBAL_EXPEDITED = 2  # smp_mb() on the calling CPU (and registered processes)
SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "riscv64": 283, "s390x": 356, "ppc64le": 365}


def sys_membarrier(machine: str | None = None) -> int | None:
    """The membarrier system call number here, or None on an architecture not listed."""
    return SYS_MEMBARRIER.get(machine or os.uname().machine)


# --- RFC 3986's unreserved characters: escapes of them are refused in paths (kernel program,
# reference model) and path patterns may spell them plainly (language, automata) ----------------

UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")

# --- how the tables are laid out for the program's code ----------------------------------------

# A tables swap (runtime/reload.py) writes new tables into a loaded program, whose code reads
# them at fixed offsets with fixed element sizes: only tables of the same layout fit. 1: objects
# from before the field (two-byte `trans` entries holding the next state); 2: four-byte entries
# holding the next state's row offset and kind bits (codegen/tables.py TRANS_KIND_SHIFT); 3: the
# literals table before `trans`, and LITERAL_BIT in its entries (codegen/literals.py); 4: twice
# the literal entries, each with the fact set of its end (methods); 5: the path automaton's default
# slot at offset 0, its class map giving class + 1, the dead state at 0 (codegen/comb.py; the
# `path_dead` config entry is gone), and that class map before `trans`; 6: `memo_tag` after
# `config`, and SECTION_MARK in a version literal's word 7 (the remembered header section:
# codegen/tables.py MEMO_*); 7: 256 literal entries, path words among them (PATH_WORD and the path
# automaton's state in word 7: an older program would take one without copying or walking it).
TABLE_LAYOUT = 7

# --- limits the program enforces (and the reference interpreter with it) -----------------------

PATH_MAX = 2048  # path bytes kept; longer paths are refused
CL_MAX = 0xFFFF0000  # Content-Length values above this are refused (apply_bytes takes a u32)
CHUNK_MAX = 0xFFFF0000  # likewise chunk sizes
# The largest packet offset the verifier accepts is 0xffff, and data[i] is read with data + i + 1.
MAX_SCAN = 0xFFFE


def head_limit(max_head: int) -> int:
    """The bytes of a message a policy's `max-head` lets the program judge: the kernel reads at
    most MAX_SCAN, so `max-head 64KiB` judges as 65,534 bytes (the compiler's tables, the
    interpreter, the tables' Python mirror and lint all take it from here)."""
    return min(max_head, MAX_SCAN)


# The most instructions the verifier may process to accept sockpol_msg: a tenth of its limit, so
# that the next verifier change that multiplies the count (as upstream f597664454bd did, from
# about 200,000 to over the limit) is caught by the tests and by `sockpol doctor`, not by a user
# whose policies stop loading. Checked on every kernel of the VM matrix (docs/kernels.md).
VERIFIER_BUDGET = 100_000
VERIFIER_LIMIT = 1_000_000
KERNELS_DOC = "docs/kernels.md"


# --- why a request was refused ------------------------------------------------------------------


class Reason(IntEnum):
    """Why a request was refused. Those below scanner.TERMINAL_STATES are also scanner states;
    the number is what counters and events carry, the slug what people read and write (poltest
    files, `sockpol explain`, metrics labels)."""

    NONE = 0
    BAD_METHOD = 3
    BAD_TARGET = 4
    AMBIGUOUS_PATH = 5
    BAD_VERSION = 6
    BAD_HEADER = 7
    DUPLICATE_HEADER = 8
    BAD_CONTENT_LENGTH = 9
    TRANSFER_ENCODING = 10
    UPGRADE = 11
    PATH_TOO_LONG = 12
    BAD_CHUNK = 13
    # Decided by the program, not by a scanner state:
    HEAD_TOO_LARGE = 14
    PULL_FAILED = 15
    RULE = 16  # refused by a deny rule
    DEFAULT = 17  # refused by the policy default
    # TLS (docs/ktls.md): decided by the program's record walk before any HTTP is seen.
    TLS_NOT_DECLARED = 18  # a TLS record on a policy without `tls`
    TLS_USERSPACE = 19  # application data encrypted in user space: no request can be read
    TLS_BAD_RECORD = 20  # a record that no TLS client sends at that point of a handshake

    @property
    def slug(self) -> str:
        """BAD_METHOD -> "bad-method"."""
        return self.name.lower().replace("_", "-")


REASON_TEXT = {
    Reason.BAD_METHOD: "request line does not start with a method token and one space",
    Reason.BAD_TARGET: "request target is not an origin-form path with valid characters",
    Reason.AMBIGUOUS_PATH: "path has an encoded '/', '\\' or NUL, or a malformed %-escape",
    Reason.BAD_VERSION: "protocol is not HTTP/1.0 or HTTP/1.1 followed by CRLF",
    Reason.BAD_HEADER: "malformed header line (bad name, control byte, bare CR/LF, obs-fold)",
    Reason.DUPLICATE_HEADER: "Host, Content-Length or Transfer-Encoding appears more than once",
    Reason.BAD_CONTENT_LENGTH: "Content-Length is not a single decimal number below 4 GiB",
    Reason.TRANSFER_ENCODING: "Transfer-Encoding other than 'chunked', or with Content-Length",
    Reason.UPGRADE: "Upgrade header: the bytes after a protocol switch would not be HTTP/1.x",
    Reason.PATH_TOO_LONG: "path longer than 2048 bytes",
    Reason.BAD_CHUNK: "malformed chunk-size line, chunk framing or trailer",
    Reason.HEAD_TOO_LARGE: "request head (or chunk-size line) longer than the policy's max-head",
    Reason.PULL_FAILED: "the kernel could not linearize the message or allocate state",
    Reason.RULE: "refused by a deny rule",
    Reason.DEFAULT: "no rule matched and the default is deny",
    Reason.TLS_NOT_DECLARED: "a TLS handshake on a port whose policy does not say `tls`",
    Reason.TLS_USERSPACE: "TLS done in user space (no kTLS): the requests are ciphertext",
    Reason.TLS_BAD_RECORD: "TLS record framing that no client sends during a handshake",
}

# Refusals before any rule, by slug, in the order the reference interpreter lists them (a
# poltest file names one of these after `refused`).
BEFORE_RULES = (
    Reason.BAD_METHOD, Reason.BAD_TARGET, Reason.AMBIGUOUS_PATH, Reason.BAD_VERSION,
    Reason.BAD_HEADER, Reason.DUPLICATE_HEADER, Reason.BAD_CONTENT_LENGTH,
    Reason.TRANSFER_ENCODING, Reason.UPGRADE, Reason.PATH_TOO_LONG, Reason.BAD_CHUNK,
    Reason.HEAD_TOO_LARGE, Reason.TLS_NOT_DECLARED, Reason.TLS_USERSPACE, Reason.TLS_BAD_RECORD,
)  # fmt: skip


def reason_slug(value: int) -> str:
    """The slug of a reason number as counters and events carry it ("reason-N" if unknown)."""
    try:
        return Reason(value).slug
    except ValueError:
        return f"reason-{value}"


# --- answers: the response the kernel writes in place of a refused request ----------------------

# Every response is exactly ANSWER_BYTES long (the body is padded with spaces before its final
# newline): the program sizes the refused message to that, writes it as ANSWER_BYTES / 8 words
# copied from the tables, and redirects it into the sending socket's own receive queue.
ANSWER_BYTES = 320
MAX_ANSWERS = 4  # distinct answers per policy (its own and the rules' overrides)
ANSWER_STATUS_MIN, ANSWER_STATUS_MAX = 400, 599
# Reasons answered with a response (refusals of a request head); the others (TLS records, a
# failed pull) are always dropped. The tables hold one response per answer and `reason & 15`.
ANSWERED_REASONS = frozenset(range(3, 15)) | {16, 17}
ANSWER_ROWS = 16
assert len({r & (ANSWER_ROWS - 1) for r in ANSWERED_REASONS}) == len(ANSWERED_REASONS)
# The reason phrases of the statuses (RFC 9110 and others); any other status says "Refused".
STATUS_PHRASES = {
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 409: "Conflict", 410: "Gone",
    411: "Length Required", 412: "Precondition Failed", 413: "Content Too Large",
    414: "URI Too Long", 415: "Unsupported Media Type", 416: "Range Not Satisfiable",
    417: "Expectation Failed", 421: "Misdirected Request", 422: "Unprocessable Content",
    423: "Locked", 424: "Failed Dependency", 425: "Too Early", 426: "Upgrade Required",
    428: "Precondition Required", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 451: "Unavailable For Legal Reasons",
    500: "Internal Server Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
    506: "Variant Also Negotiates", 507: "Insufficient Storage", 508: "Loop Detected",
    510: "Not Extended", 511: "Network Authentication Required",
}  # fmt: skip
ANSWER_HEADER = "Sockpol-Refused"  # the marker that tells sockpol's answer from the server's
_ANSWER_BODY_ROOM = 110  # what a body may take before padding, for every name and status


def answer_response(policy: str, status: int, reason: str) -> bytes:
    """The response for a refusal (reason: its slug) by `policy` answered with `status`: never
    a byte of the request. `Connection: close`: the connection takes no more requests."""
    phrase = STATUS_PHRASES.get(status, "Refused")
    body = f"{status} {phrase}: refused by sockpol policy {policy} ({reason})"
    detail = next((text for r, text in REASON_TEXT.items() if r.slug == reason), "")
    if detail and len(body) + len(detail) + 2 <= _ANSWER_BODY_ROOM:
        body += f": {detail}"
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain\r\n"
        "Content-Length: {length}\r\n"
        "Connection: close\r\n"
        f"{ANSWER_HEADER}: policy={policy}; reason={reason}\r\n\r\n"
    )
    # The body is padded to make the whole ANSWER_BYTES long; Content-Length counts the padding.
    for length in range(len(body) + 1, ANSWER_BYTES):
        text = head.replace("{length}", str(length)) + body
        if len(text) + (length - len(body)) == ANSWER_BYTES:
            out = (text + " " * (length - len(body) - 1) + "\n").encode()
            assert len(out) == ANSWER_BYTES
            return out
    raise ValueError(f"answer for policy {policy!r}, reason {reason!r} is too long")


# --- the connection's word (socket storage, bits 0..7: where the next run starts) ---------------

RESUME_REQUEST = 0  # a request head
RESUME_CHUNK_LINE = 1  # a chunk-size line
RESUME_CHUNK_DATA_END = 2  # the CRLF after a chunk's data
RESUME_UNJUDGED = 3  # dry-run lost the framing: the rest of the connection passes unjudged
RESUME_TLS_PASS = 4  # `tls userspace allow`: the rest of the connection passes unjudged
RESUME_ANSWERED = 5  # a refusal was answered: every later byte is discarded, send() succeeds
RESUME_REFUSED = 6  # (LSM backend) a refusal ended the connection for sending: every send fails
# Bit 24 (LSM backend): the head in progress began in an earlier send, which passed; the scan's
# state is saved in the connection's storage and the next send goes on from there.
CONN_HEAD_PART = 1 << 24
# Bits 16..23: the TLS walk (model/tls.py).
CONN_HTTP = 1 << 16  # past the handshake (or none): the bytes are HTTP
CONN_HELLO = 1 << 17  # a ClientHello passed
CONN_CCS = 1 << 18  # a ChangeCipherSpec passed
CONN_TLS12_DONE = 1 << 19  # the TLS 1.2 Finished passed
CONN_TLS13_DONE = 1 << 20  # the TLS 1.3 Finished passed
CONN_TLS_FLAGS = CONN_HELLO | CONN_CCS | CONN_TLS12_DONE | CONN_TLS13_DONE
CONN_DONE = CONN_TLS12_DONE | CONN_TLS13_DONE
