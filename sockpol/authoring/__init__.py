"""What policy authors run on a laptop or a CI runner: lint, fmt, test files and explain.

The top of the language side: it builds on the language (dsl), the reference model (interp) and
the automata (lint decides shadowing by language inclusion), and never on the runtime: no root,
no kernel support, no libbpf (tests/test_authoring.py checks it). commands.py holds the four
commands, which `sockpol.cli` imports only when one of them runs.
"""
