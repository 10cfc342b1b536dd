"""Throw-away certificates for TLS tests: a CA, a server certificate for 127.0.0.1, client certificates.

Made with the openssl command line (the `cryptography` package is not installed), valid for a day, EC P-256.
`stranger` is a client certificate from another CA, which a mutual-TLS server must refuse.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from client import TLS


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _key_and_request(folder: Path, name: str, subject: str) -> tuple[Path, Path]:
    key, request = folder / f"{name}-key.pem", folder / f"{name}.csr"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
             "-out", str(request), "-subj", subject)
    return key, request


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}-key.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
             "-out", str(cert), "-days", "1", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _signed(folder: Path, name: str, subject: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, request = _key_and_request(folder, name, subject)
    ext = folder / f"{name}.ext"
    ext.write_text(extensions)
    cert = folder / f"{name}.pem"
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", str(cert), "-days", "1", "-extfile", str(ext))
    return cert, key


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate signed by another CA
    stranger_key: Path

    def trust(self) -> TLS:
        """A client that trusts the CA and presents no certificate."""
        return TLS(ca_file=self.ca)

    def client(self) -> TLS:
        """A client that trusts the CA and presents the CA-signed client certificate (mutual TLS)."""
        return TLS(ca_file=self.ca, cert_file=self.client_cert, key_file=self.client_key)

    def stranger(self) -> TLS:
        """A client that trusts the CA but presents a certificate from another CA."""
        return TLS(ca_file=self.ca, cert_file=self.stranger_cert, key_file=self.stranger_key)

    def https_args(self, require_client_certificate: bool = False) -> list[str]:
        """`bentoml serve` options for HTTPS with the server certificate; optionally mutual TLS."""
        args = ["--ssl-certfile", str(self.server_cert), "--ssl-keyfile", str(self.server_key)]
        if require_client_certificate:
            args += ["--ssl-ca-certs", str(self.ca), "--ssl-cert-reqs", "2"]  # ssl.CERT_REQUIRED
        return args

    def grpc_env(self, require_client_certificate: bool = False) -> dict[str, str]:
        """PNEUMONIA_GRPC__TLS__* settings for gRPC over TLS; optionally mutual TLS."""
        env = {"PNEUMONIA_GRPC__TLS__CERTFILE": str(self.server_cert), "PNEUMONIA_GRPC__TLS__KEYFILE": str(self.server_key)}
        if require_client_certificate:
            env["PNEUMONIA_GRPC__TLS__CLIENT_CA_FILE"] = str(self.ca)
        return env


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca = _ca(folder, "test-ca")
    server = _signed(folder, "server", "/CN=127.0.0.1", ca,
                     "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    client = _signed(folder, "client", "/CN=test-client", ca, "extendedKeyUsage=clientAuth\n")
    other_ca = _ca(folder, "other-ca")
    stranger = _signed(folder, "stranger", "/CN=stranger", other_ca, "extendedKeyUsage=clientAuth\n")
    return Pki(ca=ca[0], server_cert=server[0], server_key=server[1], client_cert=client[0], client_key=client[1],
               stranger_cert=stranger[0], stranger_key=stranger[1])
