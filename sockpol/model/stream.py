"""The kernel's send path (Linux's tcp_bpf_sendmsg) as a model, whoever judges each program run.

One model of a governed connection for both the reference interpreter (model/interp.py, which
judges a run from the policy's syntax tree) and the tables' mirror (codegen/simulate.py, which
judges it from the compiled tables): they differ only in how one run of the program is judged,
so `Stream` takes that as a method (`judge_run`) and keeps everything else: per connection the
verdict in force, how many more bytes it covers (apply_bytes), a corked message with the bytes
still owed before the next run, the judge's own state between runs (what the program keeps in
socket storage), a refusal ending the connection for sending, and a refusal *answered*: the
program rewrites the rest of the message into a response and redirects it into the client's own
receive queue, so nothing of it leaves and send() reports it sent; the runs after it discard
every byte the same way. It predicts, for a list of sends, the bytes the server receives and what
each send() returns. It assumes every send fits
one kernel message (sends of a few KiB).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

State = TypeVar("State")  # what the program keeps in socket storage between runs
Record = TypeVar("Record")  # what a judge says about one run (a verdict, a table run's result)

_NONE, _PASS, _DROP = "none", "pass", "drop"


@dataclass(frozen=True)
class Send:
    data: bytes
    returned: int | None  # what send() returns; None when it fails with EACCES

    @property
    def failed(self) -> bool:
        return self.returned is None


@dataclass(frozen=True)
class Judged(Generic[State, Record]):
    """One run of the program on one message, as a judge sees it."""

    allow: bool
    covers: int  # bytes of the message the verdict covers (apply_bytes); 0: the whole message
    cork: int = 0  # > 0: hold the message until it is this long, then run again
    state: State | None = None  # the storage for the next run (None: unchanged)
    record: Record | None = None  # what the run decided, kept in `records` when not None
    # The whole message is consumed and nothing of it leaves: a refusal answered (the message
    # becomes the response, redirected to the client) or a send after it (discarded). send()
    # counts these bytes as sent.
    discard: bool = False


class Stream(Generic[State, Record]):
    """A governed TCP connection, send by send. Subclasses say how one run is judged."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.delivered = bytearray()
        self.sends: list[Send] = []
        self.records: list[Record] = []  # what the runs decided, in order
        self._eval = _NONE
        self._apply = 0
        self._cork: bytearray | None = None  # a held message, waiting for `_owed` more bytes
        self._owed = 0
        self.answered = False  # a refusal was answered: the client reads a response

    def judge_run(self, message: bytes) -> Judged[State, Record]:
        raise NotImplementedError

    def governed(self) -> bool:
        return True

    @property
    def refused(self) -> bool:
        """A refusal ended the connection for sending: every later send fails."""
        return self._eval == _DROP

    @property
    def held(self) -> bytes:
        """Bytes accepted by send() but held by the kernel (a head still incomplete)."""
        return bytes(self._cork) if self._cork is not None else b""

    def send(self, data: bytes) -> Send:
        result = Send(data, self._send(data))
        self.sends.append(result)
        return result

    def _send(self, data: bytes) -> int | None:
        if not self.governed() or not data:
            self.delivered += data
            return len(data)
        msg = self._cork if self._cork is not None else bytearray()
        msg += data
        copied = len(data)
        if self._owed:
            self._owed = max(0, self._owed - len(data))
            if self._owed:
                return copied  # still held; send() reports every byte as sent
            self._eval = _NONE  # all owed bytes are here: run the program again
        # The held message is judged now; the kernel lets go of it unless the run corks again
        # (seen on 6.18: after a cork is drained, later messages are not held by it).
        self._cork = None
        copied -= self._verdict(msg)
        # A send that lost more than it brought (a refused head held from earlier sends) fails.
        return copied if copied > 0 else None

    def _verdict(self, msg: bytearray) -> int:
        """tcp_bpf_send_verdict: pass or drop `msg` run by run; returns the bytes dropped."""
        while True:
            if self._eval == _NONE:
                run = self.judge_run(bytes(msg))
                if run.record is not None:
                    self.records.append(run.record)
                if run.cork:
                    self._owed = run.cork - len(msg)
                    self._cork = msg
                    return 0
                if run.discard:
                    if run.state is not None:
                        self.state = run.state
                    self.answered = True
                    del msg[:]
                    return 0
                self._eval = _PASS if run.allow else _DROP
                self._apply = run.covers
                if run.state is not None:
                    self.state = run.state
            tosend = len(msg)
            if self._apply and self._apply < tosend:
                tosend = self._apply
            chunk = bytes(msg[:tosend])
            del msg[:tosend]
            self._apply = self._apply - tosend if self._apply > tosend else 0
            if self._eval == _DROP:
                return tosend  # and the verdict stays: every later send is dropped too
            self.delivered += chunk
            if not self._apply:
                self._eval = _NONE
            if not msg:
                return 0


__all__ = ["Judged", "Send", "Stream"]
