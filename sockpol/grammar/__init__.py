"""The policy grammar (`policy.lark`) and the one LALR parser built from it.

Building the LALR tables takes tens of milliseconds, so the parser is built once per process.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from lark import Lark

GRAMMAR_FILE = "policy.lark"


@cache
def parser() -> Lark:
    """The LALR parser for one line of a policy file (start rule `line`).

    The basic lexer, not lark's default contextual one: a contextual lexer matches keywords as
    prefixes of words (`policyfoo` would become `policy foo`), the basic one only as whole words.
    """
    text = resources.files(__package__).joinpath(GRAMMAR_FILE).read_text(encoding="utf-8")
    return Lark(
        text,
        parser="lalr",
        lexer="basic",
        start="line",
        propagate_positions=True,
        maybe_placeholders=False,
    )
