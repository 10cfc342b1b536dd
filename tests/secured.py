"""The secured server of the session: configured the way a hospital deployment would be.

HTTPS with a certificate from a CA made here, gRPC over mutual TLS (clients need
a certificate from the same CA), API keys from an environment variable and a
file, /health protected, a tight rate limit, one CORS origin, and client
identifiers allowed in the log (the positive control of the privacy test).
tests/test_security.py checks the policy; tests/test_client.py checks the
typed client against it. Each key is spent by one test only, so rate-limit
buckets never carry over between tests.
"""

from __future__ import annotations

from pathlib import Path

from harness.servers import ServerProcess, bentoml_serve, free_port
from harness.tls import Pki, make_pki

KEY_ENV = "env-key-" + "a" * 24
KEY_FILE = "file-key-" + "b" * 24
KEY_HTTP_LIMIT = "file-key-" + "c" * 24  # only the HTTP rate-limit test spends this one's tokens
KEY_GRPC_LIMIT = "file-key-" + "d" * 24  # only the gRPC rate-limit test
KEY_CLIENT = {"http": "file-key-" + "e" * 24, "grpc": "file-key-" + "f" * 24}  # only the typed-client tests
KEY_CLI_LIMIT = {"http": "file-key-" + "g" * 24, "grpc": "file-key-" + "h" * 24}  # only the CLI's rate-limit test
KEY_CLI_LARGE = {"http": "file-key-" + "i" * 24, "grpc": "file-key-" + "j" * 24}  # only the CLI's byte-limit test
ORIGIN = "https://viewer.example"
BURST = 20
PER_MINUTE = 60
MAX_REQUEST = 2_000_000


def start_secured(folder: Path) -> tuple[ServerProcess, Pki]:
    """Started and warm (every worker), or an exception with the server already stopped."""
    pki = make_pki(folder / "pki")
    keys = folder / "api-keys.txt"
    lines = ["# one key per line", KEY_FILE, "", KEY_HTTP_LIMIT, KEY_GRPC_LIMIT, *KEY_CLIENT.values(),
             *KEY_CLI_LIMIT.values(), *KEY_CLI_LARGE.values()]
    keys.write_text("\n".join(lines) + "\n")
    server = bentoml_serve(
        "service:PneumoniaClassifier",
        free_port(),
        folder / "server.log",
        serve_args=pki.https_args(),
        tls=pki.trust(),
        PNEUMONIA_SECURITY__API_KEYS=KEY_ENV,
        PNEUMONIA_SECURITY__API_KEYS_FILE=str(keys),
        PNEUMONIA_SECURITY__PROTECT_HEALTH="true",
        PNEUMONIA_SECURITY__RATE_LIMIT__ENABLED="true",
        PNEUMONIA_SECURITY__RATE_LIMIT__REQUESTS_PER_MINUTE=str(PER_MINUTE),
        PNEUMONIA_SECURITY__RATE_LIMIT__BURST=str(BURST),
        PNEUMONIA_SECURITY__CORS__ALLOW_ORIGINS=ORIGIN,
        PNEUMONIA_REQUEST_LOG__CLIENT_IDENTIFIERS="true",
        PNEUMONIA_MAX_REQUEST_BYTES=str(MAX_REQUEST),
        PNEUMONIA_WORKERS="1",  # one bucket per key: rate limits are kept per worker process
        **pki.grpc_env(require_client_certificate=True),
    )
    server.start()  # waits for /readyz over HTTPS and for every worker's "model warm" line
    return server, pki
