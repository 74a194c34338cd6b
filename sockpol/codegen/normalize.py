"""Path normalization, as the kernel program does it, byte by byte.

Applied to the raw path (from the leading `/` up to `?` or the space before the version), after the
scanner has refused what is ambiguous (`%2F`, `%5C`, `%00`, malformed escapes):

1. Percent-escapes of unreserved characters (RFC 3986 ALPHA DIGIT - . _ ~) are decoded; other
   escapes stay escaped, with their hex digits upper-cased (`%3a` -> `%3A`).
2. Repeated slashes are merged (`//` -> `/`).
3. Dot segments are removed as RFC 3986 5.2.4 does (`/a/./b` -> `/a/b`, `/a/b/../c` -> `/a/c`,
   `/a/..` -> `/`, `..` above the root stays at the root), after decoding (`%2e%2E` is `..`).

`Normalizer` is a streaming state machine with bounded memory so that `emit.py` can implement it in
the kernel the same way; `normalize()` runs it over a whole path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sockpol.contract import MAX_DEPTH, PATH_MAX, UNRESERVED  # noqa: F401 -- re-exported

HEX_DIGITS = b"0123456789ABCDEF"
# seg_dots counts the dots of a segment that has only dots so far, saturating at NOT_DOTS: only
# "." and ".." segments matter, and a small bounded value keeps the kernel verifier's view finite.
NOT_DOTS = 3

# Percent-decoding states.
PCT_LEADING_SLASH = 3  # the first byte is the path's leading "/", already in the output
PCT_NONE, PCT_PERCENT, PCT_HEX1 = 0, 1, 2


def hex_value(c: int) -> int:
    return int(chr(c), 16)


@dataclass
class Normalizer:
    out: bytearray = field(default_factory=lambda: bytearray(b"/"))
    seg_start: int = 1
    seg_dots: int = 0
    stack: list[int] = field(default_factory=list)
    pct: int = PCT_LEADING_SLASH
    hex1: int = 0
    error: bool = False  # too long or too deep

    def feed(self, c: int) -> None:
        if self.pct == PCT_LEADING_SLASH:
            self.pct = PCT_NONE
        elif self.pct == PCT_PERCENT:
            self.hex1, self.pct = c, PCT_HEX1
        elif self.pct == PCT_HEX1:
            self.pct = PCT_NONE
            value = hex_value(self.hex1) * 16 + hex_value(c)
            if value in UNRESERVED:
                self._char(value)
            else:
                for raw in (ord("%"), HEX_DIGITS[value >> 4], HEX_DIGITS[value & 15]):
                    self._append(raw)
                self.seg_dots = NOT_DOTS
        elif c == ord("%"):
            self.pct = PCT_PERCENT
        else:
            self._char(c)

    def finish(self) -> None:
        """The path ended: a final `.` or `..` segment goes, keeping the slash before it."""
        seg_len = len(self.out) - self.seg_start
        if seg_len == 1 and self.seg_dots == 1:
            del self.out[self.seg_start :]
        elif seg_len == 2 and self.seg_dots == 2:
            self._pop()

    def _char(self, c: int) -> None:
        seg_len = len(self.out) - self.seg_start
        if c != ord("/"):
            all_dots = c == ord(".") and self.seg_dots == seg_len
            self.seg_dots = min(self.seg_dots + 1, NOT_DOTS) if all_dots else NOT_DOTS
            self._append(c)
            return
        if seg_len == 0:
            return  # "//": merged
        if seg_len == 1 and self.seg_dots == 1:
            del self.out[self.seg_start :]  # "/./": the "." goes, the slash before it stays
        elif seg_len == 2 and self.seg_dots == 2:
            self._pop()  # "/../": back to the start of the previous segment
        else:
            if len(self.stack) >= MAX_DEPTH:
                self.error = True
                return
            self.stack.append(self.seg_start)
            self._append(c)
            self.seg_start = len(self.out)
        self.seg_dots = 0

    def _pop(self) -> None:
        if self.stack:
            self.seg_start = self.stack.pop()
        del self.out[self.seg_start :]
        self.seg_dots = 0

    def _append(self, c: int) -> None:
        if len(self.out) >= PATH_MAX:
            self.error = True
            return
        self.out.append(c)


def normalize(path: bytes) -> bytes | None:
    """The normalized form of a raw path that starts with `/`; None if too long or too deep."""
    n = Normalizer()
    for c in path:
        n.feed(c)
    n.finish()
    return None if n.error else bytes(n.out)
