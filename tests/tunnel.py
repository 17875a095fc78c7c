"""An egress CONNECT proxy and a TLS front for the fake Stripe, both real servers on 127.0.0.1.

The bridge reaches Stripe over https through an operator's proxy: the proxy sees a CONNECT and
relays bytes; TLS runs end to end. The front plays Stripe's TLS terminator (a certificate made here
by openssl, for `stripe.test` and localhost) before the fake Stripe's plain HTTP.
"""

from __future__ import annotations

import selectors
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def clear_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unsets every proxy variable requests reads, in either case."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@dataclass(frozen=True)
class Certificates:
    """A test CA and a server certificate it signed."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(
    folder: Path, names: tuple[str, ...] = ("stripe.test", "localhost")
) -> Certificates:
    """A CA and a certificate for names, by openssl (None of it leaves folder)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key, request = folder / "server.pem", folder / "server.key", folder / "server.csr"
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    subprocess.run(
        [openssl, "req", "-x509", *curve, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=bridge test CA", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        [openssl, "req", "-new", *curve, "-keyout", key, "-out", request,
         "-subj", f"/CN={names[0]}"],
        check=True, capture_output=True,
    )  # fmt: skip
    extensions = folder / "server.ext"
    extensions.write_text(
        "subjectAltName=" + ",".join(f"DNS:{name}" for name in names) + "\n"
        "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n"
    )
    subprocess.run(
        [openssl, "x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", extensions],
        check=True, capture_output=True,
    )  # fmt: skip
    return Certificates(ca, cert, key)


def relay(one: socket.socket, other: socket.socket) -> None:
    """Copies bytes both ways, in one thread (a TLS socket is not safe to use from two), until
    either side closes or both are quiet for 30 s."""
    peers = {one: other, other: one}
    with selectors.DefaultSelector() as selector:
        for side in peers:
            selector.register(side, selectors.EVENT_READ)
        while ready := selector.select(timeout=30):
            for key, _ in ready:
                source = cast(socket.socket, key.fileobj)
                try:
                    data = source.recv(65536)
                    while isinstance(source, ssl.SSLSocket) and source.pending():
                        data += source.recv(65536)
                    if not data:
                        return
                    peers[source].sendall(data)
                except ssl.SSLWantReadError:
                    continue
                except OSError:
                    return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class ConnectProxy:
    """A CONNECT-only proxy that asks for Basic credentials if given some, and records each tunnel:
    (host:port asked for, Proxy-Authorization sent)."""

    def __init__(self, hosts: Mapping[str, str], authorization: str | None = None) -> None:
        self.hosts = dict(hosts)  # name -> address the proxy resolves it to
        self.authorization = authorization
        self.tunnels: list[tuple[str, str | None]] = []
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                line = self.rfile.readline(65537).decode("latin-1")
                headers = {}
                while (header := self.rfile.readline(65537).decode("latin-1")) not in (
                    "\r\n",
                    "\n",
                    "",
                ):
                    name, _, value = header.partition(":")
                    headers[name.strip().lower()] = value.strip()
                method, target, _ = line.split(" ", 2)
                sent = headers.get("proxy-authorization")
                proxy.tunnels.append((target, sent))
                if method != "CONNECT":
                    self.wfile.write(
                        b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n"
                    )
                    return
                if proxy.authorization is not None and sent != proxy.authorization:
                    self.wfile.write(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                        b'Proxy-Authenticate: Basic realm="egress"\r\nContent-Length: 0\r\n\r\n'
                    )
                    return
                host, _, port = target.rpartition(":")
                address = (proxy.hosts.get(host, host), int(port))
                with socket.create_connection(address, 5) as upstream:
                    self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    self.wfile.flush()
                    relay(self.connection, upstream)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        """The proxy's address, without credentials."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Stops listening."""
        self.server.shutdown()
        self.server.server_close()


class TlsFront:
    """TLS on 127.0.0.1 with the test certificate, relayed in the clear to a plain HTTP server."""

    def __init__(self, certificates: Certificates, backend: tuple[str, int]) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificates.cert, certificates.key)

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    tls = context.wrap_socket(self.request, server_side=True)
                except (ssl.SSLError, OSError):
                    return  # a client that did not trust the certificate
                with socket.create_connection(backend, 5) as upstream:
                    relay(tls, upstream)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stops listening."""
        self.server.shutdown()
        self.server.server_close()
