"""The reference model: what a policy decides for a stream of sends, written from
docs/language.md and not from the code generator (interp.py), and the TLS handshake walk that
the model and the kernel program share as one decision (tls.py).

Above the language (it evaluates the checked syntax tree), below code generation: the tables'
Python mirror (codegen/simulate.py) and the differential tests are held to it.
"""
