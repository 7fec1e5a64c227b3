"""Security settings end to end: API token on Estimate, TLS and mTLS on both front ends,
secrets never in the log."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from statevalue.backends.torch_backend import TorchBackend
from statevalue.settings import ServerSettings
from statevalue_client import Group, Rollout, ValueClient
from tests.servers import ServerThread, metric_value, running_server

TOKEN = "api-token-7f3c1b"
GROUP = Group([1, 2, 3], [Rollout([4, 5, 6], 1.0), Rollout([7, 8], 0.0)], group_id="g")
BODY = {
    "methods": ["numca"],
    "groups": [
        {
            "group_id": "g",
            "prompt_ids": [1, 2, 3],
            "rollouts": [
                {"response_ids": [4, 5, 6], "reward": 1.0},
                {"response_ids": [7, 8], "reward": 0.0},
            ],
        }
    ],
}


def test_secrets_come_from_files_and_never_print(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("admin-secret-91\n")
    settings = ServerSettings(admin_token_file=token_file, api_token=TOKEN)
    assert settings.secret("admin_token") == "admin-secret-91"
    assert settings.secret("api_token") == TOKEN
    shown = settings.model_dump_json() + repr(settings) + str(settings)
    assert "admin-secret-91" not in shown and TOKEN not in shown
    with pytest.raises(ValidationError, match="not both"):
        ServerSettings(admin_token="x", admin_token_file=token_file)
    with pytest.raises(ValidationError, match="go together"):
        ServerSettings(tls_cert=token_file)


@pytest.fixture(scope="module")
def guarded(backend: TorchBackend) -> Iterator[ServerThread]:
    with running_server(backend, api_token=TOKEN) as running:
        yield running


def test_estimate_needs_the_api_token(guarded: ServerThread) -> None:
    url = f"{guarded.http_url}/v1/estimate"
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        refused = httpx.post(url, json=BODY, headers=headers, timeout=30)
        assert refused.status_code == 401, refused.text
    answered = httpx.post(url, json=BODY, headers={"authorization": f"Bearer {TOKEN}"})
    assert answered.status_code == 200, answered.text
    with ValueClient(guarded.grpc_target, retries=0) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.estimate([GROUP], ["numca"])
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with ValueClient(guarded.grpc_target, retries=0, api_token=TOKEN) as client:
        assert client.estimate([GROUP], ["numca"]).groups[0].group_id == "g"
    page = guarded.metrics()
    labels = '{frontend="http",rpc="estimate",status="401"}'
    assert metric_value(page, "statevalue_requests_total", labels) == 3
    labels = '{frontend="grpc",rpc="Estimate",status="UNAUTHENTICATED"}'
    assert metric_value(page, "statevalue_requests_total", labels) == 1
    # Health and metrics stay open to probes and scrapers.
    assert httpx.get(f"{guarded.http_url}/readyz").status_code == 200


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(key if issuer is None else issuer[1], hashes.SHA256())


def _write(path: Path, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA and a server and a client certificate it signed (ca/server/client .crt/.key)."""
    folder = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("statevalue test CA", ca_key, None)
    _write(folder / "ca", ca, ca_key)
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(folder / name, _certificate(name, key, (ca, ca_key)), key)
    return folder


def test_tls_and_mutual_tls_on_both_front_ends(backend: TorchBackend, certificates: Path) -> None:
    ca, server_crt, server_key = (
        certificates / "ca.crt",
        certificates / "server.crt",
        certificates / "server.key",
    )
    with_client_cert = ssl.create_default_context(cafile=str(ca))
    with_client_cert.load_cert_chain(certificates / "client.crt", certificates / "client.key")
    with running_server(backend, tls_cert=server_crt, tls_key=server_key) as server:
        port = server.server.http_port
        secure = httpx.post(
            f"https://127.0.0.1:{port}/v1/estimate", json=BODY, verify=str(ca), timeout=30
        )
        assert secure.status_code == 200, secure.text
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        with ValueClient(server.grpc_target, retries=0, credentials=credentials) as client:
            assert client.estimate([GROUP], ["numca"]).groups[0].group_id == "g"
        with ValueClient(server.grpc_target, retries=0, timeout=5) as plain:
            with pytest.raises(grpc.RpcError) as caught:
                plain.estimate([GROUP], ["numca"])
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    with running_server(
        backend, tls_cert=server_crt, tls_key=server_key, tls_client_ca=ca
    ) as server:
        url = f"https://127.0.0.1:{server.server.http_port}/v1/estimate"
        with pytest.raises(httpx.TransportError):
            httpx.post(url, json=BODY, verify=str(ca), timeout=5)
        with httpx.Client(verify=with_client_cert) as http:
            assert http.post(url, json=BODY, timeout=30).status_code == 200
        no_cert = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        with ValueClient(server.grpc_target, retries=0, timeout=5, credentials=no_cert) as client:
            with pytest.raises(grpc.RpcError):
                client.estimate([GROUP], ["numca"])
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca.read_bytes(),
            private_key=(certificates / "client.key").read_bytes(),
            certificate_chain=(certificates / "client.crt").read_bytes(),
        )
        with ValueClient(server.grpc_target, retries=0, credentials=with_cert) as client:
            assert client.estimate([GROUP], ["numca"]).groups[0].group_id == "g"
