"""Proves the Cloud KMS stand-in (tests/fakes/gcp_kms_fake.py) speaks the real wire protocols: the
official Python client `google-cloud-kms`, on both its REST and its gRPC transports, with
google-auth credentials (service-account key, workload identity federation through STS, the
metadata server for the REST transport), completes
key ring and key creation, encrypt/decrypt, get key, rotation (new primary version), disable and
destroy against it, and gets Google's errors where the service gives them. Also pins the stand-in's
strictness: no token / a wrong token / a wrong field name / a wrong resource name are refused in
Google's error shape.

Skipped (not failed) only when KMS_TEST_OPT_OUT names `gcp-fake`.
"""

import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

OPT_OUT = "gcp-fake" in os.environ.get("KMS_TEST_OPT_OUT", "").split(",")
try:
    import grpc
    from google.api_core import exceptions as gexc
    from google.auth import credentials as ga_credentials
    from google.auth import identity_pool
    from google.cloud import kms_v1
    from google.oauth2 import service_account
except ImportError:  # pragma: no cover - depends on the environment
    if OPT_OUT:
        pytest.skip("gcp-fake opted out (KMS_TEST_OPT_OUT)", allow_module_level=True)
    raise

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "gcp_kms_fake.py"
PARENT = "projects/kms-plugin-test/locations/global"
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


@pytest.fixture(scope="module")
def fake():
    d = tempfile.mkdtemp(prefix="gcp-fake-")
    proc = subprocess.Popen(
        [sys.executable, str(FAKE), "--port", "0", "--grpc-port", "0", "--dir", d, "--exit-on-stdin-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("PORT "), "fake did not start: %r" % line
    gline = proc.stdout.readline()
    assert gline.startswith("GRPC_PORT "), gline
    yield {"port": int(line.split()[1]), "grpc_port": int(gline.split()[1]), "dir": Path(d)}
    proc.stdin.close()
    proc.terminate()
    proc.wait(timeout=10)


def url(fake):
    return "http://127.0.0.1:%d" % fake["port"]


def control(fake, action, body=None):
    req = urllib.request.Request(
        url(fake) + "/__control/" + action,
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read() or b"{}")


def sa_credentials(fake):
    return service_account.Credentials.from_service_account_file(str(fake["dir"] / "sa.json"), scopes=SCOPES)


def wif_credentials(fake):
    info = json.loads((fake["dir"] / "external.json").read_text())
    return identity_pool.Credentials.from_info(info, scopes=SCOPES)


def client(fake, transport, creds):
    if transport == "rest":
        return kms_v1.KeyManagementServiceClient(
            credentials=creds, transport="rest", client_options={"api_endpoint": url(fake)}
        )
    ca = (fake["dir"] / "ca.pem").read_bytes()
    t = kms_v1.services.key_management_service.transports.KeyManagementServiceGrpcTransport(
        host="127.0.0.1:%d" % fake["grpc_port"],
        credentials=creds,
        ssl_channel_credentials=grpc.ssl_channel_credentials(root_certificates=ca),
    )
    return kms_v1.KeyManagementServiceClient(transport=t)


@pytest.fixture(params=["rest", "grpc"])
def transport(request):
    return request.param


@pytest.mark.parametrize("creds", ["service-account", "workload-identity"])
def test_full_lifecycle(fake, transport, creds):
    c = client(fake, transport, sa_credentials(fake) if creds == "service-account" else wif_credentials(fake))
    ring_id = "ring-%s-%s" % (transport, creds.split("-")[0])
    ring = c.create_key_ring(request={"parent": PARENT, "key_ring_id": ring_id, "key_ring": {}})
    assert ring.name == "%s/keyRings/%s" % (PARENT, ring_id)
    key = c.create_crypto_key(
        request={
            "parent": ring.name,
            "crypto_key_id": "kek",
            "crypto_key": {"purpose": kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT},
        }
    )
    assert key.primary.name == key.name + "/cryptoKeyVersions/1"
    assert key.primary.state == kms_v1.CryptoKeyVersion.CryptoKeyVersionState.ENABLED

    enc = c.encrypt(request={"name": key.name, "plaintext": b"\x00seed" * 6, "additional_authenticated_data": b"cluster-a"})
    assert enc.name == key.primary.name and enc.ciphertext
    dec = c.decrypt(request={"name": key.name, "ciphertext": enc.ciphertext, "additional_authenticated_data": b"cluster-a"})
    assert dec.plaintext == b"\x00seed" * 6 and dec.used_primary
    with pytest.raises(gexc.BadRequest):
        c.decrypt(request={"name": key.name, "ciphertext": enc.ciphertext, "additional_authenticated_data": b"cluster-b"})

    got = c.get_crypto_key(request={"name": key.name})
    assert got.purpose == kms_v1.CryptoKey.CryptoKeyPurpose.ENCRYPT_DECRYPT and got.primary.name == enc.name

    # Rotation: a new version made primary; old ciphertexts keep decrypting.
    v2 = c.create_crypto_key_version(request={"parent": key.name, "crypto_key_version": {}})
    assert v2.name == key.name + "/cryptoKeyVersions/2"
    c.update_crypto_key_primary_version(request={"name": key.name, "crypto_key_version_id": "2"})
    assert c.get_crypto_key(request={"name": key.name}).primary.name == v2.name
    enc2 = c.encrypt(request={"name": key.name, "plaintext": b"new"})
    assert enc2.name == v2.name
    old = c.decrypt(request={"name": key.name, "ciphertext": enc.ciphertext, "additional_authenticated_data": b"cluster-a"})
    assert old.plaintext == b"\x00seed" * 6 and not old.used_primary

    # Disable version 1: only its data is refused, with FAILED_PRECONDITION naming the state.
    upd = c.update_crypto_key_version(
        request={
            "crypto_key_version": {"name": enc.name, "state": kms_v1.CryptoKeyVersion.CryptoKeyVersionState.DISABLED},
            "update_mask": {"paths": ["state"]},
        }
    )
    assert upd.state == kms_v1.CryptoKeyVersion.CryptoKeyVersionState.DISABLED
    with pytest.raises(gexc.BadRequest) as e:
        c.decrypt(request={"name": key.name, "ciphertext": enc.ciphertext, "additional_authenticated_data": b"cluster-a"})
    assert "DISABLED" in e.value.message
    assert c.decrypt(request={"name": key.name, "ciphertext": enc2.ciphertext}).plaintext == b"new"
    assert c.get_crypto_key_version(request={"name": enc.name}).state == kms_v1.CryptoKeyVersion.CryptoKeyVersionState.DISABLED

    # Destroy version 2 (scheduled): its data is refused too.
    d = c.destroy_crypto_key_version(request={"name": v2.name})
    assert d.state == kms_v1.CryptoKeyVersion.CryptoKeyVersionState.DESTROY_SCHEDULED
    with pytest.raises(gexc.BadRequest) as e:
        c.decrypt(request={"name": key.name, "ciphertext": enc2.ciphertext})
    assert "DESTROY_SCHEDULED" in e.value.message

    with pytest.raises(gexc.NotFound):
        c.get_crypto_key(request={"name": ring.name + "/cryptoKeys/missing"})
    with pytest.raises(gexc.Conflict):
        c.create_key_ring(request={"parent": PARENT, "key_ring_id": ring_id, "key_ring": {}})


# CRC32C of b"123456789": the algorithm's published check value, independent of the stand-in's code.
CRC32C_CHECK = 0xE3069283


def test_integrity_fields(fake, transport):
    name = PARENT + "/keyRings/crc-%s/cryptoKeys/k" % transport
    control(fake, "key", {"name": name, "action": "create"})
    c = client(fake, transport, sa_credentials(fake))
    enc = c.encrypt(request={"name": name, "plaintext": b"123456789", "plaintext_crc32c": CRC32C_CHECK})
    assert enc.verified_plaintext_crc32c and not enc.verified_additional_authenticated_data_crc32c
    assert enc.ciphertext_crc32c
    dec = c.decrypt(request={"name": name, "ciphertext": enc.ciphertext, "ciphertext_crc32c": enc.ciphertext_crc32c})
    assert dec.plaintext == b"123456789" and dec.plaintext_crc32c == CRC32C_CHECK
    with pytest.raises(gexc.BadRequest) as e:
        c.encrypt(request={"name": name, "plaintext": b"123456789", "plaintext_crc32c": CRC32C_CHECK ^ 1})
    assert "plaintext_crc32c" in e.value.message
    with pytest.raises(gexc.BadRequest) as e:
        c.decrypt(request={"name": name, "ciphertext": enc.ciphertext, "ciphertext_crc32c": enc.ciphertext_crc32c ^ 1})
    assert "ciphertext_crc32c" in e.value.message


class Wrong(ga_credentials.Credentials):
    """Credentials that send a made-up bearer token."""

    def refresh(self, request):
        self.token = "ya29.not-issued-by-anyone"
        self.expiry = None

    def apply(self, headers, token=None):
        headers["authorization"] = "Bearer " + (token or self.token)

    @property
    def valid(self):
        return self.token is not None


def test_wrong_token_refused(fake, transport):
    name = PARENT + "/keyRings/strict-%s/cryptoKeys/k" % transport
    control(fake, "key", {"name": name, "action": "create"})
    c = client(fake, transport, Wrong())
    with pytest.raises(gexc.Unauthorized) as e:
        c.get_crypto_key(request={"name": name})
    assert e.value.reason == "ACCESS_TOKEN_EXPIRED"
    # The same call with real credentials works.
    assert client(fake, transport, sa_credentials(fake)).get_crypto_key(request={"name": name}).name == name


def raw(fake, method, path, body=None, token=None):
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    req = urllib.request.Request(url(fake) + path, data=json.dumps(body).encode() if body is not None else None,
                                 headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_strict_rest(fake):
    key = PARENT + "/keyRings/strict2/cryptoKeys/k"
    control(fake, "key", {"name": key, "action": "create"})
    status, body = raw(fake, "POST", "/v1/%s:encrypt" % key, {"plaintext": "AAAA"})
    assert status == 401 and body["error"]["status"] == "UNAUTHENTICATED"
    assert body["error"]["details"][0]["reason"] == "CREDENTIALS_MISSING"
    creds = sa_credentials(fake)
    import google.auth.transport.requests as gtr

    creds.refresh(gtr.Request())
    status, body = raw(fake, "POST", "/v1/%s:encrypt" % key, {"plain_text": "AAAA"}, creds.token)
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT" and "plain_text" in body["error"]["message"]
    status, body = raw(fake, "POST", "/v1/%s:encrypt" % key.replace("cryptoKeys", "cryptokeys"), {"plaintext": "AAAA"}, creds.token)
    assert status == 400 and body["error"]["status"] == "INVALID_ARGUMENT"
    status, body = raw(fake, "GET", "/v1/%s" % (key + "x"), None, creds.token)
    assert status == 404 and body["error"]["status"] == "NOT_FOUND"
    status, body = raw(fake, "POST", "/v1/%s:encrypt" % key, {"plaintext": "AAAA"}, creds.token)
    assert status == 200 and body["name"] == key + "/cryptoKeyVersions/1"
    control(fake, "key", {"name": key, "action": "deny"})
    status, body = raw(fake, "POST", "/v1/%s:encrypt" % key, {"plaintext": "AAAA"}, creds.token)
    assert status == 403 and body["error"]["details"][0]["reason"] == "IAM_PERMISSION_DENIED"


def test_token_endpoints(fake):
    import google.auth.transport.requests as gtr

    # The OAuth2 JWT-bearer grant (what google-auth does without self-signed JWTs).
    creds = sa_credentials(fake).with_always_use_jwt_access(False)
    creds.refresh(gtr.Request())
    assert creds.token.startswith("ya29.fake-")
    wif = wif_credentials(fake)
    wif.refresh(gtr.Request())
    assert wif.token.startswith("ya29.fake-")
    stats = json.loads(urllib.request.urlopen(url(fake) + "/__control/stats", timeout=5).read())
    assert stats["issued"]["jwt_bearer"] >= 1 and stats["issued"]["sts"] >= 1
    # The wrong subject token is refused by STS.
    info = json.loads((fake["dir"] / "external.json").read_text())
    bad = fake["dir"] / "bad-subject"
    bad.write_text("not-the-subject")
    info["credential_source"] = {"file": str(bad)}
    with pytest.raises(Exception):
        identity_pool.Credentials.from_info(info, scopes=SCOPES).refresh(gtr.Request())


METADATA_CHECK = """
import sys
import google.auth.transport.requests as gtr
from google.auth import compute_engine
from google.cloud import kms_v1

creds = compute_engine.Credentials()
creds.refresh(gtr.Request())
assert creds.token.startswith("ya29.fake-"), creds.token
c = kms_v1.KeyManagementServiceClient(credentials=creds, transport="rest", client_options={"api_endpoint": sys.argv[1]})
print(c.get_crypto_key(request={"name": sys.argv[2]}).primary.name)
"""


def test_metadata_server(fake):
    # google-auth reads GCE_METADATA_HOST when it is imported: run it in a fresh interpreter.
    key = PARENT + "/keyRings/mds/cryptoKeys/k"
    control(fake, "key", {"name": key, "action": "create"})
    host = "127.0.0.1:%d" % fake["port"]
    env = dict(os.environ, GCE_METADATA_HOST=host, GCE_METADATA_IP=host)
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    out = subprocess.run(
        [sys.executable, "-c", METADATA_CHECK, url(fake), key], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == key + "/cryptoKeyVersions/1"
    # Without the Metadata-Flavor header the metadata server refuses, as Google's does.
    req = urllib.request.Request(url(fake) + "/computeMetadata/v1/instance/service-accounts/default/token")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 403
