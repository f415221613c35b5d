"""Who may talk to the split server: TLS / mutual TLS credentials and bearer-token authentication.

Three settings, chosen by :class:`SecurityConfig`:

* ``tls='none'``: plaintext (loopback experiments only); optionally a bearer token.
* ``tls='server'``: the server proves itself with a certificate the client checks against ``ca_cert``.
* ``tls='mutual'``: additionally the client presents a certificate signed by ``ca_cert``; the TLS
  handshake itself refuses any other client (gRPC reports ``UNAVAILABLE`` to it).

A ``token`` (any of the three) is sent as ``authorization: Bearer <token>`` metadata on every call and
compared in constant time by :class:`TokenAuthInterceptor`; a missing or wrong token, or more than one
``authorization`` entry, gets ``UNAUTHENTICATED``. Without TLS the token crosses in the clear, so use it with TLS outside loopback.

:func:`make_test_pki` writes a throwaway PKI with the ``openssl`` command line tool (offline): a CA, a
server certificate for ``localhost``/``127.0.0.1``, a client certificate from that CA and one from an
unrelated CA (for refusal tests)::

    python -m qtl_jax.split.security /tmp/qtl_pki
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping

import grpc

TLS_MODES = ("none", "server", "mutual")
AUTH_METADATA_KEY = "authorization"


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    """TLS mode, PEM file paths and the shared token (``None``: no token check).

    Server side reads ``server_cert``/``server_key`` (and ``ca_cert`` to verify clients under 'mutual');
    client side reads ``ca_cert`` (and ``client_cert``/``client_key`` under 'mutual').
    """

    tls: str = "none"
    ca_cert: str | None = None
    server_cert: str | None = None
    server_key: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    token: str | None = None
    # The name the server certificate must carry (TLS); 'localhost' fits make_test_pki's certificate.
    server_name: str = "localhost"

    def __post_init__(self):
        if self.tls not in TLS_MODES:
            raise ValueError(f"tls={self.tls!r}: use one of {TLS_MODES}.")
        if self.token is not None and not self.token:
            raise ValueError("token is empty; give a non-empty shared secret or None for no token check.")

    @classmethod
    def from_config(cls, c) -> SecurityConfig:
        """From an ml_collections ``security`` section (empty strings mean unset)."""
        d = {f.name: (c.get(f.name) or None) for f in dataclasses.fields(cls)}
        d["tls"] = d["tls"] or "none"
        d["server_name"] = d["server_name"] or "localhost"
        return cls(**d)


def _read(path: str | None, what: str) -> bytes:
    if not path:
        raise ValueError(f"{what} is not set; it is required by this TLS mode (see docs/network_split.md).")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}={path!r} does not exist.")
    with open(path, "rb") as f:
        return f.read()


def check_files(paths: Mapping[str, str | None]) -> None:
    """``FileNotFoundError`` naming the flag if a file given in ``paths`` (flag name -> path or None) is missing.

    The command lines call it first, so a mistyped certificate or token path fails before any model is
    built or data is prepared.
    """
    for name, path in paths.items():
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"--{name}={path!r} does not exist.")


def server_credentials(sec: SecurityConfig) -> grpc.ServerCredentials | None:
    """Credentials for ``server.add_secure_port`` (``None``: plaintext ``add_insecure_port``)."""
    if sec.tls == "none":
        return None
    pair = [(_read(sec.server_key, "server_key"), _read(sec.server_cert, "server_cert"))]
    if sec.tls == "server":
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(pair, root_certificates=_read(sec.ca_cert, "ca_cert"),
                                       require_client_auth=True)


def open_channel(target: str, sec: SecurityConfig, options: list[tuple[str, object]]) -> grpc.Channel:
    """A channel to ``target`` under ``sec`` (TLS verifies the server's certificate against ``ca_cert``)."""
    if sec.tls == "none":
        return grpc.insecure_channel(target, options=options)
    key = chain = None
    if sec.tls == "mutual":
        key, chain = _read(sec.client_key, "client_key"), _read(sec.client_cert, "client_cert")
    creds = grpc.ssl_channel_credentials(root_certificates=_read(sec.ca_cert, "ca_cert"), private_key=key,
                                         certificate_chain=chain)
    options = list(options) + [("grpc.ssl_target_name_override", sec.server_name)]
    return grpc.secure_channel(target, creds, options=options)


def call_metadata(sec: SecurityConfig) -> tuple[tuple[str, str], ...]:
    return ((AUTH_METADATA_KEY, f"Bearer {sec.token}"),) if sec.token else ()


def _refusal(message: str) -> grpc.RpcMethodHandler:
    def deny(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(deny)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses every call that does not carry exactly one ``authorization: Bearer <token>`` (UNAUTHENTICATED).

    A call with several ``authorization`` entries is refused whatever they hold: which one a check
    reads is an accident of the code (a dict keeps the last), so "wrong, right" must not pass where
    "right, wrong" fails.
    """

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()
        self._deny = _refusal("missing or wrong bearer token: send 'authorization: Bearer <token>' metadata "
                              "(client config security.token).")
        self._deny_several = _refusal("more than one 'authorization' metadata entry: send exactly one "
                                      "'authorization: Bearer <token>'.")

    def intercept_service(self, continuation, handler_call_details):
        got = [value for key, value in (handler_call_details.invocation_metadata or ())
               if key.lower() == AUTH_METADATA_KEY]
        if len(got) > 1:
            return self._deny_several
        value = got[0] if got else ""
        value = value.encode() if isinstance(value, str) else bytes(value)
        if hmac.compare_digest(value, self._expected):
            return continuation(handler_call_details)
        return self._deny


# ---------------------------------------------------------------------------------------------------
# Test certificates


def _openssl(*args: str, cwd: str) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise FileNotFoundError("the openssl command line tool is needed to make certificates; install openssl.")
    out = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {out.stderr.strip()}")


def _ca(name: str, cwd: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=cwd)


def _leaf(name: str, ca: str, usage: str, cwd: str, san: str | None = None) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    ext = f"{name}.ext"
    with open(os.path.join(cwd, ext), "w", encoding="utf-8") as f:
        f.write(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n")
        if san:
            f.write(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "30", "-extfile", ext, cwd=cwd)


def make_test_pki(directory: str) -> dict[str, str]:
    """Writes a CA, server and client certificates under ``directory``; returns their paths.

    Keys: ``ca_cert``, ``server_cert``/``server_key`` (for localhost and 127.0.0.1), ``client_cert``/
    ``client_key`` (signed by the CA), ``rogue_cert``/``rogue_key`` (a client certificate from another CA).
    For tests and trying things out: the keys are unencrypted and valid for 30 days.
    """
    os.makedirs(directory, exist_ok=True)
    _ca("ca", directory)
    _ca("rogue_ca", directory)
    _leaf("server", "ca", "serverAuth", directory, san="DNS:localhost,IP:127.0.0.1")
    _leaf("client", "ca", "clientAuth", directory)
    _leaf("rogue", "rogue_ca", "clientAuth", directory)
    p = lambda f: os.path.join(os.path.abspath(directory), f)  # noqa: E731
    return {"ca_cert": p("ca.pem"), "server_cert": p("server.pem"), "server_key": p("server.key"),
            "client_cert": p("client.pem"), "client_key": p("client.key"),
            "rogue_cert": p("rogue.pem"), "rogue_key": p("rogue.key")}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m qtl_jax.split.security DIRECTORY  (writes a test CA and certificates there)")
    for k, v in make_test_pki(sys.argv[1]).items():
        print(f"{k}: {v}")
