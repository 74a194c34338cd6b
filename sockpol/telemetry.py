"""What a loaded policy tells its operators: the layouts of its counters, events and control map.

Shared by the code generator (which writes these maps from the kernel program), the Python mirror
(`codegen/simulate.py`) and the runtime (which reads them from the pins). Every compiled object
records the numbers below in its metadata (`PolicyMetadata.telemetry`), and the runtime reads
them from there, so a newer CLI still decodes the maps of an object compiled by an older one.

Maps (BTF-defined in `.maps`, pinned as `map_<name>` next to the programs):

`sockpol_counts`  PERCPU_ARRAY, key u32 slot, value `struct { u64 requests; u64 bytes; }` per CPU;
                  readers sum the CPUs. Slots:
                    0                 the default decided (allow or deny)
                    1                 events lost (ring buffer full); `bytes` unused
                    2                 sends passed unjudged: a dry-run connection whose framing
                                      was lost (see `contract.RESUME_UNJUDGED`)
                    3                 refusals answered with a response (`answer`): requests
                                      answered; bytes discarded (the refused sends and every
                                      send after them on those connections)
                    4 + reason        refused, by `contract.Reason` (RULE and DEFAULT included)
                    36 + reason       would have been refused: dry-run mode, or an audit rule
                    68 + rule         the rule decided (whatever its action)
`sockpol_events`  RINGBUF of `EVENT` records (below), `EVENTS_BYTES` bytes.
`sockpol_evbuf`   PERCPU_ARRAY, one `EVENT` record: where the program assembles an event before
                  `bpf_ringbuf_output` copies it (packet bytes cannot go to a helper directly).
`sockpol_ctl`     ARRAY, one `struct { u32 mode; u32 serial; u32 answers_off; }`: MODE_ENFORCE or
                  MODE_DRY_RUN, the serial of the version in force (older ones hand over:
                  emit.handover), and 1 where this kernel cannot answer refusals (they drop).
                  Read by every run, written by `sockpol mode`: switching needs no reload.
"""

from __future__ import annotations

import struct
from enum import IntEnum

COUNTS_MAP = "sockpol_counts"
EVENTS_MAP = "sockpol_events"
EVBUF_MAP = "sockpol_evbuf"
CTL_MAP = "sockpol_ctl"
TELEMETRY_FORMAT = 1

# Ring buffer size: a power of two and a multiple of the page size. One event takes
# EVENT.size + 8 bytes (the ring buffer's record header): about 860 events fit.
EVENTS_BYTES = 256 * 1024

MODE_ENFORCE, MODE_DRY_RUN = 0, 1
NO_RULE = 0xFFFFFFFF  # "no rule decided" wherever a rule index goes (events, the scan state)
MODES = {"enforce": MODE_ENFORCE, "dry-run": MODE_DRY_RUN}
MODE_NAMES = {v: k for k, v in MODES.items()}
CTL = struct.Struct("<III")  # mode, serial, answers_off
CTL_SERIAL = 4  # offset of the serial: the loaded version whose program judges (emit.handover)
# answers_off (byte offset 8): 1 when the loader found that this kernel cannot answer a refusal
# (redirect a response into the sending socket): refusals are then dropped, as with `answer drop`.
CTL_ANSWERS_OFF = 8

# Per-rule flags in the rule table (the `allow` table of the tables): what a matching rule does.
RULE_PASS = 1  # the request passes (allow, audit)
RULE_LOG = 2  # record an event (log on an allow rule)
RULE_AUDIT = 4  # record an event as a would-be refusal by this rule (audit)
# Bits 8..9: the rule's answer, an index into the policy's answers (0: the policy's own).
RULE_ANSWER_SHIFT = 8

# Counter slots.
REASON_SLOTS = 32  # contract.Reason values stay below this
SLOT_DEFAULT = 0
SLOT_LOST = 1
SLOT_UNJUDGED = 2
SLOT_ANSWERED = 3
SLOT_REFUSED = 4
SLOT_WOULD_REFUSE = SLOT_REFUSED + REASON_SLOTS
SLOT_RULES = SLOT_WOULD_REFUSE + REASON_SLOTS
COUNTER = struct.Struct("<QQ")  # requests, bytes


def counter_slots(max_rules: int) -> int:
    return SLOT_RULES + max_rules


class EventKind(IntEnum):
    """What an event records."""

    REFUSED = 1  # the request was refused
    DRY_RUN = 2  # it would have been refused; the policy runs in dry-run mode, so it passed
    AUDIT = 3  # an audit rule matched: it passed, and would be refused by a deny rule
    LOGGED = 4  # a rule marked `log` passed it


VERDICT_NAMES = {
    EventKind.REFUSED: "refused",
    EventKind.DRY_RUN: "dry-run",
    EventKind.AUDIT: "audit",
    EventKind.LOGGED: "logged",
}

# contract.RESUME_UNJUDGED: the resume value of a connection that a dry-run pass left without HTTP
# framing (the scanner refused its head, so where the next request starts is unknown). Later sends
# pass unjudged while the policy stays in dry-run, and are refused, for the reason saved in bits
# 8..15, once it enforces: in enforce mode the connection would be gone.

# The event record. Bounded copies: the method's first METHOD_BYTES bytes; the first HOST_BYTES
# bytes of the value of the head's first line starting `host:` (any case), as sent, blanks after
# the colon included (readers trim them); the canonical path's first PATH_BYTES bytes.
# path_len is the whole canonical path's length (up to 2048, the path's limit);
# method_len and host_len are the bytes copied, or one more than the room (17, 65) when the
# value was longer and was cut.
METHOD_BYTES = 16
HOST_BYTES = 64
PATH_BYTES = 128
EVENT_FIELDS = [
    ("time_ns", "Q"),  # bpf_ktime_get_ns(): CLOCK_MONOTONIC
    ("pid_tgid", "Q"),  # bpf_get_current_pid_tgid(): tgid << 32 | pid of the sender
    ("cgroup_id", "Q"),  # bpf_get_current_cgroup_id() of the sender
    ("rule", "I"),  # index of the deciding rule, NO_RULE when none decided
    ("size", "I"),  # bytes in the message the program judged (msg->size)
    ("verdict", "B"),  # EventKind
    ("reason", "B"),  # contract.Reason (NONE for LOGGED)
    ("method_len", "B"),
    ("host_len", "B"),  # 0: no Host header found in the judged bytes
    ("path_len", "H"),
    ("family", "H"),  # AF_INET or AF_INET6 (sk_msg_md.family)
    ("remote_port", "I"),  # sk_msg_md.remote_port as the kernel gives it (network order)
    ("local_port", "I"),  # sk_msg_md.local_port (host order)
    ("remote_ip4", "4s"),  # network order
    ("local_ip4", "4s"),
    ("remote_ip6", "16s"),
    ("local_ip6", "16s"),
    ("method", f"{METHOD_BYTES}s"),
    ("host", f"{HOST_BYTES}s"),
    ("path", f"{PATH_BYTES}s"),
    # A refusal answered with a response: its HTTP status; 0: dropped (or not a refusal). The
    # status is the one the program set out to write; the answered counter counts successes.
    ("answer", "H"),
    ("reserved", "6s"),
]
EVENT = struct.Struct("<" + "".join(f for _, f in EVENT_FIELDS))
assert EVENT.size % 8 == 0, EVENT.size


def event_offsets() -> dict[str, int]:
    out, offset = {}, 0
    for name, fmt in EVENT_FIELDS:
        out[name] = offset
        offset += struct.calcsize("<" + fmt)
    return out


EVENT_OFFSETS = event_offsets()


def layout() -> dict[str, object]:
    """The numbers a reader needs, as recorded in an object's metadata."""
    return {
        "format": TELEMETRY_FORMAT,
        "slot_default": SLOT_DEFAULT,
        "slot_lost": SLOT_LOST,
        "slot_unjudged": SLOT_UNJUDGED,
        "slot_answered": SLOT_ANSWERED,
        "slot_refused": SLOT_REFUSED,
        "slot_would_refuse": SLOT_WOULD_REFUSE,
        "slot_rules": SLOT_RULES,
        "event_size": EVENT.size,
        "event_fields": [list(f) for f in EVENT_FIELDS],
        "events_bytes": EVENTS_BYTES,
    }
