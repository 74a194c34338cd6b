"""sockpol: HTTP/API access policy compiled to BPF sk_msg programs and enforced in the kernel."""

__version__ = "0.1.0"
