"""The receiving side (`side ingress`) as a model: what the server of a governed connection
receives, segment by segment, and what the client reads instead of a refused request.

The decisions are the send path's (interp.Connection judges the same byte stream with the same
framing: heads, bodies, chunks, pipelining); what differs is delivery, because the kernel's
sk_skb verdict program sees each segment (skb) once and cannot hold bytes (docs/design.md,
"The receiving side"):

- the bytes of a head that a segment cuts pass to the server at once (the send path holds
  them); the head is judged when its end arrives;
- a refusal ends the connection for the server: nothing of the refused request's last segment
  reaches it, nor anything after. Answered (`answer STATUS`, the ingress default 403), the whole
  segment becomes the response: requests before the refused one in that segment are not
  delivered either. Dropped (`answer drop`), they are: the segment is cut where the refused
  request starts.
"""

from __future__ import annotations

from sockpol.dsl.ast import Mode, Policy
from sockpol.model.interp import Connection, Verdict


class Receiver:
    """One accepted connection of an ingress policy, fed the segments the client's bytes
    arrive in."""

    def __init__(self, policy: Policy, mode: Mode | None = None) -> None:
        self.judge = Connection(policy, mode)
        self.stream = bytearray()  # every byte the client sent
        self.delivered = bytearray()  # what the server can read
        self.answer = 0  # the status of the response the client reads (0: none)
        self.closed = False  # a refusal ended the connection for the server

    @property
    def verdicts(self) -> list[Verdict]:
        return self.judge.verdicts

    def receive(self, segment: bytes) -> None:
        if self.closed or not segment:
            return
        start = len(self.stream)
        self.stream += segment
        self.judge.send(segment)
        if not (self.judge.refused or self.judge.answered):
            self.delivered += segment  # a head cut by the segment's end included
            return
        self.closed = True
        if self.judge.answered:
            self.answer = next((v.answer for v in reversed(self.verdicts) if v.answer), 0)
            return
        # Dropped: the send path delivered everything before the refused request.
        end = max(start, len(self.judge.delivered))
        self.delivered += self.stream[start:end]


def receive_segments(policy: Policy, segments: list[bytes], mode: Mode | None = None) -> Receiver:
    r = Receiver(policy, mode)
    for segment in segments:
        r.receive(segment)
    return r


__all__ = ["Receiver", "receive_segments"]
