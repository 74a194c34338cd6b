"""The reference semantics of a rule's path pattern, glob or `~"regex"`, as a Python regex.

Its own module so that the two pattern languages import in one direction: regex.py builds on
patterns.py (escapes, problems), and this module on both.
"""

from __future__ import annotations

from sockpol.dsl import regex
from sockpol.dsl.patterns import Pattern, glob_to_regex


def to_regex(pattern: str | Pattern) -> str:
    """A Python regex, anchored at both ends with flags embedded, matching exactly the canonical
    paths the pattern matches; use it with `re.match` or `re.fullmatch`."""
    if isinstance(pattern, str) and regex.is_regex(pattern):
        return regex.to_python(pattern)
    return glob_to_regex(pattern)
