"""Kernel TLS (kTLS) from Python: the socket options and crypto-info structs of linux/tls.h.

sockpol itself never does a TLS handshake. These helpers exist for the kernel probe (`probe.py`)
and for tests, which hand the kernel static keys so that the sk_msg program can be watched judging
the plaintext of a kTLS socket without any TLS library in the way.

The order that works (kernel selftest sockmap_ktls.c, verified on 6.1): the sk_msg program is
attached to the sockhash, the socket is connected and inserted, and only then `TCP_ULP "tls"` and
`TLS_TX` are set. Inserting a socket that already has the tls ULP fails with EINVAL, and kernels
carrying "tls: reject the combination of TLS and sockmap" refuse TLS on a socket in a sockhash.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

# linux/tcp.h, linux/socket.h, linux/tls.h (stable UAPI values)
TCP_ULP = 31
SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2

TLS_1_2_VERSION = 0x0303
TLS_1_3_VERSION = 0x0304

TLS_STAT = Path("/proc/net/tls_stat")


@dataclass(frozen=True)
class Cipher:
    name: str
    type: int  # TLS_CIPHER_* of linux/tls.h
    iv_size: int
    key_size: int
    salt_size: int
    rec_seq_size: int = 8


AES_GCM_128 = Cipher("AES-128-GCM", 51, iv_size=8, key_size=16, salt_size=4)
AES_GCM_256 = Cipher("AES-256-GCM", 52, iv_size=8, key_size=32, salt_size=4)
CIPHERS = {c.name: c for c in (AES_GCM_128, AES_GCM_256)}


@dataclass(frozen=True)
class StaticKeys:
    """One direction's keying material, as a TLS library would hand it to the kernel."""

    version: int
    cipher: Cipher
    key: bytes
    iv: bytes
    salt: bytes
    rec_seq: bytes = b"\0" * 8

    @staticmethod
    def fixed(version: int = TLS_1_2_VERSION, cipher: Cipher = AES_GCM_128) -> StaticKeys:
        """Deterministic keys: both ends of a test derive the same ones, and nothing is secret."""
        return StaticKeys(
            version,
            cipher,
            key=bytes(range(1, cipher.key_size + 1)),
            iv=bytes(range(0x40, 0x40 + cipher.iv_size)),
            salt=bytes(range(0x80, 0x80 + cipher.salt_size)),
        )

    def crypto_info(self) -> bytes:
        """struct tls12_crypto_info_aes_gcm_{128,256}: version, cipher, iv, key, salt, rec_seq."""
        c = self.cipher
        sizes = (c.iv_size, c.key_size, c.salt_size, c.rec_seq_size)
        parts = (self.iv, self.key, self.salt, self.rec_seq)
        if tuple(len(p) for p in parts) != sizes:
            raise ValueError(f"{c.name}: wrong key material sizes {[len(p) for p in parts]}")
        fmt = "<HH{}s{}s{}s{}s".format(*sizes)
        return struct.pack(fmt, self.version, c.type, *parts)


def load_module() -> bool:
    """Load the tls module if the kernel has it as a module; True if TLS is there afterwards.

    The ULP is also auto-loaded by the kernel on first use (request_module("tcp-ulp-tls")), but
    only where modprobe works; loading it explicitly makes the result of a probe deterministic.
    """
    if TLS_STAT.exists():
        return True
    try:
        subprocess.run(["modprobe", "-q", "tls"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        pass
    return TLS_STAT.exists()


def set_ulp(sock: socket.socket) -> None:
    """Give a connected TCP socket the tls ULP (no keys yet: it still sends plaintext)."""
    sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")


def enable(sock: socket.socket, keys: StaticKeys, direction: int) -> None:
    """Install keys for TLS_TX or TLS_RX; the ULP must already be set."""
    sock.setsockopt(SOL_TLS, direction, keys.crypto_info())


def enable_tx(sock: socket.socket, keys: StaticKeys) -> None:
    set_ulp(sock)
    enable(sock, keys, TLS_TX)


def enable_rx(sock: socket.socket, keys: StaticKeys) -> None:
    set_ulp(sock)
    enable(sock, keys, TLS_RX)


def tls_stat() -> dict[str, int]:
    """/proc/net/tls_stat as a dict (TlsTxSw, TlsRxSw, ...); empty without the tls module."""
    try:
        text = TLS_STAT.read_text()
    except OSError:
        return {}
    return {name: int(value) for name, value in (line.split() for line in text.splitlines())}


def describe_errno(err: int | None) -> str:
    if err is None:
        return "unknown error"
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"
