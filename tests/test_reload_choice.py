"""Which way a reload takes (runtime/reload.py `_swappable`), without a kernel: a tables swap
only into a program whose code reads the same table layout."""

from __future__ import annotations

import importlib
import json
from dataclasses import replace

from sockpol.compiler import compile_source
from sockpol.contract import TABLE_LAYOUT
from sockpol.metadata import PolicyMetadata

reload_mod = importlib.import_module("sockpol.runtime.reload")  # the package exports a function

TEXT = "policy p {\n    port 8080\n    default deny\n    allow GET /x\n}\n"


def metadata(text: str = TEXT) -> PolicyMetadata:
    (c,), _ = compile_source(text, "p.pol")
    return c.metadata


def test_new_objects_say_their_table_layout_and_old_ones_read_as_layout_1() -> None:
    new = metadata()
    assert new.table_layout == TABLE_LAYOUT
    raw = json.loads(new.to_json())
    del raw["table_layout"]  # what an object compiled before the field carries
    old = PolicyMetadata.from_json(json.dumps(raw).encode())
    assert old.table_layout == 1


def test_tables_are_swapped_only_into_a_program_of_the_same_layout() -> None:
    new = metadata()
    other_rules = metadata(TEXT.replace("allow GET /x", "allow GET /y"))
    assert reload_mod._swappable(new, other_rules)
    older = replace(new, table_layout=1)  # loaded by a sockpol from before the layout change
    assert not reload_mod._swappable(older, other_rules)
    assert not reload_mod._swappable(other_rules, older)
