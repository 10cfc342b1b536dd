"""Environment variables named PNEUMONIA_* that are not settings: refused at settings load, with a suggestion."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from harness.paths import ROOT
from settings import OTHER_VARIABLES, ServingSettings, refuse_unknown_variables, setting_variables, suggestion

SECRET = "not-to-be-echoed-0123456789"
real_time = time.time
# Wrong on purpose: the names this file and the docs use as examples of mistakes.
MISTAKES = {"PNEUMONIA_SECURITY_API_KEYS", "PNEUMONIA_API_KEYS", "PNEUMONIA_FOO", "PNEUMONIA_WORKER",
            "PNEUMONIA_SETTING_FILE", "PNEUMONIA_GRPC_PORT", "PNEUMONIA_ENABLED", "PNEUMONIA_SECURITY__APIKEYS"}


@pytest.mark.parametrize("typed,meant", [
    ("PNEUMONIA_SECURITY_API_KEYS", "PNEUMONIA_SECURITY__API_KEYS"),  # one underscore where two belong
    ("PNEUMONIA_API_KEYS", "PNEUMONIA_SECURITY__API_KEYS"),  # the section left out
    ("PNEUMONIA_GRPC_PORT", "PNEUMONIA_GRPC__PORT"),
    ("PNEUMONIA_SECURITY__APIKEYS", "PNEUMONIA_SECURITY__API_KEYS"),
    ("PNEUMONIA_WORKER", "PNEUMONIA_WORKERS"),  # close spelling (difflib)
    ("PNEUMONIA_SETTING_FILE", "PNEUMONIA_SETTINGS_FILE"),  # not a setting, but a name the project reads
    ("PNEUMONIA_ENABLED", None),  # a section left out, but which one? no guess
    ("PNEUMONIA_FOO", None),
])
def test_suggestion(typed: str, meant: str | None) -> None:
    assert suggestion(typed, setting_variables()) == meant


def test_unknown_variables_are_refused_by_name_never_by_value(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError) as error:
        refuse_unknown_variables({"PNEUMONIA_SECURITY_API_KEYS": SECRET, "PNEUMONIA_FOO": "1", "HOME": "/root"})
    message = str(error.value)
    assert message.startswith("unknown environment variables PNEUMONIA_FOO, PNEUMONIA_SECURITY_API_KEYS "
                              "(did you mean PNEUMONIA_SECURITY__API_KEYS?): "), message
    assert SECRET not in message and "\n" not in message
    monkeypatch.setenv("pneumonia_security_api_keys", SECRET)  # pydantic-settings reads names in any case
    with pytest.raises(ValueError, match=r"pneumonia_security_api_keys \(did you mean PNEUMONIA_SECURITY__API_KEYS"):
        ServingSettings()


def test_settings_and_the_projects_other_variables_are_accepted_in_capitals_only() -> None:
    known = setting_variables() | set(OTHER_VARIABLES)
    assert {"PNEUMONIA_SECURITY__API_KEYS", "PNEUMONIA_SECURITY", "PNEUMONIA_GRPC__TLS__CERTFILE"} <= known
    refuse_unknown_variables({name: "" for name in known})
    # A helper's find: a lower-case PNEUMONIA_SETTINGS_FILE was accepted, and its file (API keys and all) ignored.
    for name in ("pneumonia_settings_file", "Pneumonia_Workers"):
        with pytest.raises(ValueError, match=rf"{name} \(write {name.upper()}\): PNEUMONIA_\* names are read in capitals"):
            refuse_unknown_variables({name: "x", "PNEUMONIA_WORKERS": "1"})


def test_every_pneumonia_variable_the_repository_names_is_known() -> None:
    """A PNEUMONIA_* name read by the client, the tests, a script or a doc, but missing from settings.py's
    OTHER_VARIABLES, would stop `bentoml serve` started from a shell that has it set."""
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the repository's files cannot be listed")
    named: dict[str, str] = {}
    for name in filter(None, files):
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for variable in re.findall(r"\bPNEUMONIA_[A-Z0-9_]*[A-Z0-9]\b", text):
            named.setdefault(variable, name)
    unknown = {variable: where for variable, where in named.items()
               if variable not in setting_variables() | set(OTHER_VARIABLES) | MISTAKES
               and not variable.startswith("PNEUMONIA_CLASSIFIER_")}  # Kubernetes' service links, see below
    assert not unknown, f"add these to OTHER_VARIABLES (settings.py) or fix them: {unknown}"


def test_kubernetes_service_links_are_not_settings_and_are_accepted() -> None:
    """Kubernetes sets these in every pod for deploy/kubernetes' Service pneumonia-classifier (enableServiceLinks is
    on by default); refusing them would stop every pod. A mistyped setting has no NAME_SERVICE_HOST beside it."""
    links = {
        "PNEUMONIA_CLASSIFIER_SERVICE_HOST": "10.96.0.17",
        "PNEUMONIA_CLASSIFIER_SERVICE_PORT": "3000",
        "PNEUMONIA_CLASSIFIER_SERVICE_PORT_HTTP": "3000",
        "PNEUMONIA_CLASSIFIER_SERVICE_PORT_GRPC": "3001",
        "PNEUMONIA_CLASSIFIER_PORT": "tcp://10.96.0.17:3000",
        "PNEUMONIA_CLASSIFIER_PORT_3001_TCP": "tcp://10.96.0.17:3001",
        "PNEUMONIA_CLASSIFIER_PORT_3001_TCP_PROTO": "tcp",
        "PNEUMONIA_CLASSIFIER_PORT_3001_TCP_PORT": "3001",
        "PNEUMONIA_CLASSIFIER_PORT_3001_TCP_ADDR": "10.96.0.17",
    }
    refuse_unknown_variables(links)
    with pytest.raises(ValueError, match=r"PNEUMONIA_GRPC_PORT \(did you mean PNEUMONIA_GRPC__PORT\?\)"):
        refuse_unknown_variables({**links, "PNEUMONIA_GRPC_PORT": "3001"})
    with pytest.raises(ValueError, match="PNEUMONIA_CLASSIFIER_SERVICE_HOST"):  # not an address: not Kubernetes'
        refuse_unknown_variables({"PNEUMONIA_CLASSIFIER_SERVICE_HOST": "classifier.example"})


# --------------------------------------------------------------------------- values read from files at start-up


def _settings_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    """The validation error ServingSettings raises for these PNEUMONIA_* variables (fails if it accepts them)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as refused:
        ServingSettings()
    return str(refused.value)


def test_relative_paths_in_a_settings_file_are_beside_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A key file named relative to the settings file was looked for in the server's working folder: beside the
    file it was 'missing', and a same-named file in the working folder would have been read instead."""
    import json

    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    conf.mkdir(), elsewhere.mkdir()
    (conf / "keys.txt").write_text("k3y-beside-the-settings-file\n")
    (elsewhere / "keys.txt").write_text("k3y-of-the-working-folder\n")
    (conf / "settings.json").write_text(json.dumps({"SECURITY": {"api_keys_file": "keys.txt"},
                                                    "grpc": {"tls": {"certfile": ""}}}))
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("PNEUMONIA_SETTINGS_FILE", str(conf / "settings.json"))
    settings = ServingSettings()
    assert settings.security.api_keys_file == conf / "keys.txt"
    assert settings.security.keys() == ("k3y-beside-the-settings-file",) and settings.grpc.tls.certfile is None
    monkeypatch.setenv("PNEUMONIA_SECURITY__API_KEYS_FILE", "keys.txt")  # a variable's path stays the caller's
    assert ServingSettings().security.keys() == ("k3y-of-the-working-folder",)


@pytest.mark.parametrize("content,words", [
    (b"", "holds no key (only blank or # lines)"),  # an empty Secret: an open service, before
    (b"# the key goes here\n\n   \n", "holds no key (only blank or # lines)"),
    (b"\xff\xfe" + "k\0e\0y\0".encode() * 8, "is not UTF-8 text"),
    ("ключключключключключ\n".encode(), "at least 16 printable ASCII characters"),  # no header or metadata carries it
], ids=["empty", "comments-only", "utf-16", "non-ascii-key"])
def test_an_api_key_file_that_yields_no_usable_key_is_refused(content: bytes, words: str, tmp_path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "api-keys"
    keys.write_bytes(content)
    message = _settings_error(monkeypatch, PNEUMONIA_SECURITY__API_KEYS_FILE=str(keys))
    assert words in message and "ключ" not in message


def test_a_bad_api_key_is_named_by_its_place_never_by_its_value(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key followed by an inline comment stopped the server with no file, no line and no hint."""
    keys = tmp_path / "api-keys"
    keys.write_text("# site keys\nfirstkey-abcdefghijkl\nsecondkey-abcdefghij # radiology\n")
    message = _settings_error(monkeypatch, PNEUMONIA_SECURITY__API_KEYS_FILE=str(keys),
                              PNEUMONIA_SECURITY__API_KEYS="short,envkey-abcdefghijklmnop")
    assert "not so: api_keys entry 1; " in message and f"{keys} line 3 (a # comment after the key" in message
    assert "line 2" not in message and "secondkey" not in message and "short" not in message


def test_grpc_tls_files_must_be_a_certificate_and_its_own_key(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files that only look like PEM, or a key of another certificate, passed start-up before: every worker then
    failed to bind the gRPC port (BoringSSL: "Invalid private key") while HTTP said the service was ready."""
    from harness.tls import _openssl, make_pki

    pki = make_pki(tmp_path / "pki")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN garbage-----\nnot base64\n-----END garbage-----\n")
    encrypted = tmp_path / "encrypted-key.pem"
    _openssl("pkey", "-in", str(pki.server_key), "-out", str(encrypted), "-aes256", "-passout", "pass:secret")
    cases = [
        ({"CERTFILE": pki.server_cert, "KEYFILE": pki.client_key}, f"keyfile {pki.client_key} is not the private key of certfile"),
        ({"CERTFILE": pki.server_cert, "KEYFILE": pki.server_cert}, "is not an unencrypted PEM private key"),
        ({"CERTFILE": pki.server_cert, "KEYFILE": encrypted}, "is not an unencrypted PEM private key"),
        ({"CERTFILE": garbage, "KEYFILE": pki.server_key}, f"certfile {garbage} holds no readable PEM certificate"),
        ({"CERTFILE": pki.server_cert, "KEYFILE": pki.server_key, "CLIENT_CA_FILE": garbage},
         f"client_ca_file {garbage} holds no readable PEM CA certificate"),
    ]
    for files, words in cases:
        with monkeypatch.context() as scope:
            message = _settings_error(scope, **{f"PNEUMONIA_GRPC__TLS__{k}": str(v) for k, v in files.items()})
        assert words in message, message
    # Found by a helper: files OpenSSL reads but gRPC's BoringSSL does not (a brainpool key), and an expired
    # certificate, both started a server whose gRPC port never opened or refused every client.
    brainpool_key, brainpool_cert = tmp_path / "bp-key.pem", tmp_path / "bp-cert.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:brainpoolP256r1", "-nodes", "-keyout",
             str(brainpool_key), "-out", str(brainpool_cert), "-subj", "/CN=localhost", "-days", "2")
    with monkeypatch.context() as scope:
        message = _settings_error(scope, PNEUMONIA_GRPC__TLS__CERTFILE=str(brainpool_cert),
                                  PNEUMONIA_GRPC__TLS__KEYFILE=str(brainpool_key))
    assert f"gRPC cannot use grpc.tls.certfile {brainpool_cert}" in message and "brainpool" in message, message
    expired_key, expired_cert = tmp_path / "old-key.pem", tmp_path / "old-cert.pem"
    request = tmp_path / "old.csr"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             str(expired_key), "-out", str(request), "-subj", "/CN=localhost")
    _openssl("x509", "-req", "-in", str(request), "-signkey", str(expired_key), "-days", "-1", "-out", str(expired_cert))
    with monkeypatch.context() as scope:
        message = _settings_error(scope, PNEUMONIA_GRPC__TLS__CERTFILE=str(expired_cert),
                                  PNEUMONIA_GRPC__TLS__KEYFILE=str(expired_key))
    assert f"grpc.tls.certfile {expired_cert} expired on " in message and "renew the certificate" in message, message
    # Not valid yet, as it is for a server whose clock is a day behind the certificate's issuer: clients refuse it.
    with monkeypatch.context() as scope:
        scope.setattr(time, "time", lambda: real_time() - 86400)
        message = _settings_error(scope, PNEUMONIA_GRPC__TLS__CERTFILE=str(pki.server_cert),
                                  PNEUMONIA_GRPC__TLS__KEYFILE=str(pki.server_key))
    assert f"grpc.tls.certfile {pki.server_cert} is not valid before " in message and "clock" in message, message
    with_bom = tmp_path / "bom.pem"  # a Windows editor's byte-order mark: OpenSSL reads past it, gRPC does not
    with_bom.write_bytes(b"\xef\xbb\xbf" + pki.server_cert.read_bytes())
    with monkeypatch.context() as scope:
        message = _settings_error(scope, PNEUMONIA_GRPC__TLS__CERTFILE=str(with_bom),
                                  PNEUMONIA_GRPC__TLS__KEYFILE=str(pki.server_key))
    assert f"certfile {with_bom} starts with a UTF-8 byte-order mark" in message, message
    for name, value in pki.grpc_env(require_client_certificate=True).items():  # the real pair is accepted
        monkeypatch.setenv(name, value)
    assert ServingSettings().grpc.tls.enabled


def test_torch_threads_has_a_ceiling(monkeypatch: pytest.MonkeyPatch) -> None:
    """100000 passed, and then every worker failed to start its threads and was restarted forever."""
    assert "less than or equal to 256" in _settings_error(monkeypatch, PNEUMONIA_TORCH_THREADS="100000")


def test_more_workers_than_memory_holds_gets_a_warning_at_start() -> None:
    """PNEUMONIA_WORKERS=64 was accepted without a word on a 24 GiB machine (about 45 GiB of workers)."""
    from serving.lifecycle import WORKER_MEMORY_MIB, available_memory_mib, memory_warning

    assert memory_warning(2, 4 * WORKER_MEMORY_MIB) is None
    warning = memory_warning(64, 22.5 * 1024)
    assert warning is not None and warning.startswith("64 workers need about 45.3 GiB") and "22.5 GiB" in warning
    assert 0 < available_memory_mib()


def test_a_key_file_saved_with_a_byte_order_mark_is_read(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "api-keys"
    keys.write_bytes(b"\xef\xbb\xbf" + b"a-key-of-at-least-sixteen-characters\r\n")
    monkeypatch.setenv("PNEUMONIA_SECURITY__API_KEYS_FILE", str(keys))
    assert ServingSettings().security.keys() == ("a-key-of-at-least-sixteen-characters",)


@pytest.mark.parametrize("value", [None, "", "  "])
def test_an_unset_or_empty_grpc_host_follows_the_http_host(value: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """PNEUMONIA_GRPC__HOST= (empty, as a compose file passes an unset variable) opened gRPC on every interface."""
    from serving.lifecycle import follow_http_host
    from settings import GrpcSettings

    monkeypatch.setenv("PNEUMONIA_GRPC__HOST", "")  # recorded: what follow_http_host writes is undone afterwards
    grpc = GrpcSettings(host=value)
    follow_http_host(grpc, "127.0.0.1")
    assert grpc.host == "127.0.0.1" and grpc.address.startswith("127.0.0.1:")
    assert ServingSettings().grpc.host == "127.0.0.1"  # what the workers read
    explicit = GrpcSettings(host="0.0.0.0")
    follow_http_host(explicit, "127.0.0.1")
    assert explicit.host == "0.0.0.0"


def test_limits_no_image_could_meet_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a helper: PNEUMONIA_LIMITS__MAX_PIXELS=10 (below min_side squared) started a server
    that refused every image."""
    message = _settings_error(monkeypatch, PNEUMONIA_LIMITS__MAX_PIXELS="10")
    assert "max_pixels 10 is below min_side squared (64x64 = 4,096)" in message, message
    monkeypatch.setenv("PNEUMONIA_LIMITS__MAX_PIXELS", "4096")
    assert ServingSettings().limits.max_pixels == 4096


@pytest.mark.parametrize("variables, words", [
    # gRPC takes them as C ints: the server said "listening", then every worker crashed at start, for ever
    ({"PNEUMONIA_MAX_REQUEST_BYTES": str(2**32)}, "max_request_bytes"),
    ({"PNEUMONIA_MAX_CONCURRENCY": str(2**31)}, "max_concurrency"),
    # an infinite wait: every refused request raised in the rate limiter and hung until the request timeout
    ({"PNEUMONIA_SECURITY__RATE_LIMIT__REQUESTS_PER_MINUTE": "1e-320"}, "requests_per_minute"),
    # a list of keys with no key in it: the service started open (a file with no key was already refused)
    ({"PNEUMONIA_SECURITY__API_KEYS": " , "}, "api_keys holds no key"),
])
def test_values_no_worker_can_serve_with_are_refused_before_start(variables: dict[str, str], words: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper's finds (each reproduced with `bentoml serve`)."""
    message = _settings_error(monkeypatch, **variables)
    assert words in message, message
    monkeypatch.setenv("PNEUMONIA_SECURITY__API_KEYS", "")  # empty is unset: an open service, as documented
    for name in variables:
        monkeypatch.delenv(name, raising=False)
    assert ServingSettings().security.keys() == ()


@pytest.mark.parametrize("port", [70000, -5])
def test_an_http_port_that_is_not_a_port_is_refused_in_one_line(port: int) -> None:
    """`--port 70000` said "listening on ...:70000" and bound 4464 (modulo 65536); -5 ended in a traceback."""
    from serving.lifecycle import StartupError, check_http_port

    with pytest.raises(StartupError, match=f"the HTTP port {port} is not a port"):
        check_http_port("127.0.0.1", port)


def test_a_failure_inside_the_http_guard_answers_500_at_once_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    """An exception raised in the guard or the app before any answer (a rate limiter fed a setting no validator
    foresaw) left BentoML's timeout middleware waiting: a plain-text 500 after PNEUMONIA_TIMEOUT_S, no traceback."""
    import asyncio
    import json

    from serving.http.guard import HttpGuard

    async def broken(scope, receive, send) -> None:
        raise ZeroDivisionError("a rate of 0 requests a minute")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    guard = HttpGuard(broken, ServingSettings(), upload_routes={"/classify": "images"})
    scope = {"type": "http", "method": "GET", "path": "/anything", "raw_path": b"/anything", "query_string": b"",
             "headers": [], "scheme": "http", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 3000),
             "http_version": "1.1", "asgi": {"version": "3.0"}}
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body["detail"][0]["type"] == "internal_error" and "request id" in body["error"]
    assert any("ZeroDivisionError" in (r.exc_text or "") or r.exc_info for r in caplog.records)


def test_settings_and_key_files_must_be_small_regular_files_and_empty_paths_are_unset(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper's finds: a FIFO as the settings or key file hung `bentoml serve` for good, /dev/zero filled the
    memory, and an empty file variable (as compose passes an unset one) read "." ("Is a directory")."""
    import os

    fifo = tmp_path / "settings.fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big.json"
    big.write_text("{" + " " * (2 * 1024 * 1024) + "}")
    for name in ("PNEUMONIA_SETTINGS_FILE", "PNEUMONIA_SECURITY__API_KEYS_FILE"):
        assert "not a regular file" in _settings_error(monkeypatch, **{name: str(fifo)})
        monkeypatch.delenv(name)
        assert "a settings or key file holds at most 1,048,576" in _settings_error(monkeypatch, **{name: str(big)})
        monkeypatch.delenv(name)
    tls = ("PNEUMONIA_GRPC__TLS__CERTFILE", "PNEUMONIA_GRPC__TLS__KEYFILE")  # their reads hung and filled memory too
    for files, words in (((fifo, big), f"grpc.tls.certfile {fifo} cannot be read: not a regular file"),
                         ((big, fifo), f"grpc.tls.certfile {big} is 2,097,154 bytes; a certificate or key file holds "
                                       "at most 1,048,576")):
        assert words in _settings_error(monkeypatch, **dict(zip(tls, map(str, files))))
    for name in tls:
        monkeypatch.delenv(name)
    for name in ("PNEUMONIA_SECURITY__API_KEYS_FILE", "PNEUMONIA_GRPC__TLS__CERTFILE", "PNEUMONIA_GRPC__TLS__KEYFILE"):
        monkeypatch.setenv(name, "")
    settings = ServingSettings()
    assert settings.security.api_keys_file is None and not settings.grpc.tls.enabled


@pytest.mark.parametrize("variable, field", [
    ("PNEUMONIA_TIMEOUT_S", "timeout_s"), ("PNEUMONIA_BATCHING__MAX_LATENCY_MS", "max_latency_ms"),
    ("PNEUMONIA_SECURITY__RATE_LIMIT__BURST", "burst"),
])
def test_numbers_past_a_float_are_refused(variable: str, field: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper's find: 1e400 written out passed validation, then crashed every worker in a loop (float overflow)."""
    monkeypatch.setenv(variable, "1" + "0" * 400)
    with pytest.raises(ValueError, match=field):
        ServingSettings()


@pytest.mark.parametrize("variable", ["PNEUMONIA_SECURITY__RATE_LIMIT__REQUESTS_PER_MINUTE", "PNEUMONIA_GRPC__SHUTDOWN_GRACE_S"])
def test_infinity_is_refused(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """inf turned the rate limit off while it read enabled, and made the shutdown wait unbounded (a helper's find)."""
    monkeypatch.setenv(variable, "inf")
    with pytest.raises(ValueError, match=variable.split("__")[-1].lower()):
        ServingSettings()


def test_a_settings_file_naming_a_key_twice_and_a_wildcard_grpc_host_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                                                 tmp_path: Path) -> None:
    """A helper's finds: {"workers": 2, "workers": 3} read as 3 and {"Workers": 3, "workers": 4} as 3, one value
    silently dropped; grpc.host '*' passed the start-up check, then no worker could bind it."""
    for text, key in (('{"workers": 2, "workers": 3}', "'workers'"), ('{"Workers": 3, "workers": 4}', "'workers'"),
                      ('{"grpc": {"port": 3001, "PORT": 3002}}', "'PORT'")):
        settings = tmp_path / "settings.json"
        settings.write_text(text)
        with monkeypatch.context() as scope:
            message = _settings_error(scope, PNEUMONIA_SETTINGS_FILE=str(settings))
        assert f"names {key} twice; keep one" in message, message
    with monkeypatch.context() as scope:
        message = _settings_error(scope, PNEUMONIA_GRPC__HOST="*")
    assert "grpc.host '*': write 0.0.0.0 (or ::) for every interface" in message, message


def test_cors_origins_are_kept_as_a_browser_sends_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper's find: `https://App.Example.com` and `https://a.com:443` were accepted but never matched a browser's
    Origin header (lower case, no default port), and `http://a.com:99999` was accepted at all."""
    monkeypatch.setenv("PNEUMONIA_SECURITY__CORS__ALLOW_ORIGINS", "https://App.Example.com, https://a.com:443, "
                       "http://b.org:80, http://c.org:8080")
    assert ServingSettings().security.cors.allow_origins == [
        "https://app.example.com", "https://a.com", "http://b.org", "http://c.org:8080"]
    with monkeypatch.context() as scope:
        message = _settings_error(scope, PNEUMONIA_SECURITY__CORS__ALLOW_ORIGINS="http://a.com:99999")
    assert "port 99999 is not a port" in message, message
