"""Finite automata over bytes (automaton.py) and the HTTP/1.x grammar written with them (http.py).

The lowest layer above the contract: the language (dsl: path regexes), authoring (lint) and code
generation (the head scanner, the path automaton) all build on it, and it imports none of them.
"""
