"""Proves the Key Vault stand-in (tests/fakes/azure_keyvault_fake.py) speaks the real wire protocol:
the official Python clients `azure-keyvault-keys` with `azure-identity` (ClientSecretCredential
through MSAL, WorkloadIdentityCredential with a federated token, ManagedIdentityCredential through
the IMDS stand-in) complete the bearer challenge over HTTPS, key creation, wrap/unwrap, get key,
rotation (new version), disable (unwrap then refused in Key Vault's error shape, while the
public-key wrap of a disabled RSA version still works, as on the real service) and deletion.
Also pins the stand-in's strictness: no token, a token for another audience, an expired token, an
unknown api-version and a wrong client secret are refused as the services refuse them.

Skipped (not failed) only when KMS_TEST_OPT_OUT names `azure-fake`.
"""

import base64
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

OPT_OUT = "azure-fake" in os.environ.get("KMS_TEST_OPT_OUT", "").split(",")
try:
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
    from azure.identity import ClientSecretCredential, ManagedIdentityCredential, WorkloadIdentityCredential
    from azure.keyvault.keys import KeyClient
    from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm
except ImportError:  # pragma: no cover - depends on the environment
    if OPT_OUT:
        pytest.skip("azure-fake opted out (KMS_TEST_OPT_OUT)", allow_module_level=True)
    raise

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "azure_keyvault_fake.py"


def start(extra=()):
    d = tempfile.mkdtemp(prefix="azure-fake-")
    proc = subprocess.Popen(
        [sys.executable, str(FAKE), "--dir", d, "--exit-on-stdin-eof", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line, iline = proc.stdout.readline(), proc.stdout.readline()
    assert line.startswith("PORT ") and iline.startswith("IMDS_PORT "), (line, iline)
    ids = json.loads((Path(d) / "ids.json").read_text())
    return proc, {"port": int(line.split()[1]), "imds_port": int(iline.split()[1]), "dir": Path(d), **ids}


@pytest.fixture(scope="module")
def fake():
    proc, info = start()
    # The SDKs' transports (requests) trust this bundle; MSAL goes through the same transport.
    old = {k: os.environ.get(k) for k in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")}
    os.environ["REQUESTS_CA_BUNDLE"] = os.environ["SSL_CERT_FILE"] = str(info["dir"] / "ca.pem")
    yield info
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.stdin.close()
    proc.terminate()
    proc.wait(timeout=10)


def vault(fake):
    return "https://127.0.0.1:%d" % fake["port"]


def authority(fake):
    return "127.0.0.1:%d" % fake["port"]


def raw(fake, method, path, body=None, headers=None):
    ctx = ssl.create_default_context(cafile=str(fake["dir"] / "ca.pem"))
    req = urllib.request.Request(vault(fake) + path, method=method, headers=headers or {},
                                 data=json.dumps(body).encode() if body is not None else None)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        data = e.read()
        return e.code, dict(e.headers), json.loads(data) if data.startswith(b"{") else data


def control(fake, action, body=None):
    status, _, out = raw(fake, "POST", "/__control/" + action, body or {})
    assert status == 200, out
    return out


def secret_credential(fake, secret=None):
    return ClientSecretCredential(
        fake["tenant"], fake["sp_client"], secret or (fake["dir"] / "client-secret").read_text(),
        authority=authority(fake), disable_instance_discovery=True)


def key_client(fake, credential):
    # Reached by IP address, so the challenge resource (vault.azure.net) cannot be the URL's
    # parent domain; the check itself is pinned in test_challenge_resource_is_checked.
    return KeyClient(vault(fake), credential, verify_challenge_resource=False)


def test_service_principal_create_wrap_unwrap_rotate_disable(fake):
    kc = key_client(fake, secret_credential(fake))
    key = kc.create_rsa_key("kek-sp", size=2048, key_operations=["wrapKey", "unwrapKey"])
    assert key.key_type == "RSA" and key.properties.enabled
    assert key.id.startswith(vault(fake) + "/keys/kek-sp/")
    stats = control(fake, "stats")
    assert stats["challenges"] >= 1 and stats["issued"]["client_secret"] >= 1

    crypto = CryptographyClient(key.id, secret_credential(fake), verify_challenge_resource=False)
    dek = os.urandom(32)
    wrapped = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
    assert wrapped.key_id == key.id
    assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key == dek

    got = kc.get_key("kek-sp")
    assert got.id == key.id and got.key.key_ops == ["wrapKey", "unwrapKey"]

    rotated = kc.rotate_key("kek-sp")
    assert rotated.properties.version != key.properties.version
    assert kc.get_key("kek-sp").id == rotated.id
    # The old version still unwraps what it wrapped.
    assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key).key == dek

    kc.update_key_properties("kek-sp", key.properties.version, enabled=False)
    assert kc.get_key("kek-sp", key.properties.version).properties.enabled is False
    with pytest.raises(HttpResponseError) as e:
        crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped.encrypted_key)
    assert e.value.status_code == 403
    assert e.value.error.code == "Forbidden"
    assert "disabled" in e.value.error.message

    # As Key Vault does: the private-key operation is refused with the inner code, the public-key
    # wrap of a disabled RSA version still works.
    token = secret_credential(fake).get_token("https://vault.azure.net/.default").token
    v1 = key.properties.version
    status, _, body = raw(fake, "POST", f"/keys/kek-sp/{v1}/unwrapkey?api-version=7.6",
                          {"alg": "RSA-OAEP-256", "value": base64.urlsafe_b64encode(wrapped.encrypted_key).decode()},
                          headers={"Authorization": "Bearer " + token})
    assert status == 403 and body["error"]["innererror"]["code"] == "KeyDisabled", body
    status, _, body = raw(fake, "POST", f"/keys/kek-sp/{v1}/wrapkey?api-version=7.6",
                          {"alg": "RSA-OAEP-256", "value": base64.urlsafe_b64encode(dek).decode()},
                          headers={"Authorization": "Bearer " + token})
    assert status == 200 and body["kid"] == key.id, body

    poller = kc.begin_delete_key("kek-sp")
    poller.wait()
    with pytest.raises(ResourceNotFoundError) as e:
        kc.get_key("kek-sp")
    assert e.value.error.code == "KeyNotFound"


def test_workload_identity(fake):
    cred = WorkloadIdentityCredential(
        tenant_id=fake["tenant"], client_id=fake["wi_client"],
        token_file_path=str(fake["dir"] / "federated-token"), authority=authority(fake),
        disable_instance_discovery=True)
    kc = key_client(fake, cred)
    key = kc.create_rsa_key("kek-wi", size=2048)
    crypto = CryptographyClient(key.id, cred, verify_challenge_resource=False)
    dek = os.urandom(32)
    w = crypto.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, dek)
    assert crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, w.encrypted_key).key == dek
    assert control(fake, "stats")["issued"]["workload_identity"] >= 1


def test_managed_identity(fake, monkeypatch):
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://127.0.0.1:%d" % fake["imds_port"])
    for cred in (ManagedIdentityCredential(), ManagedIdentityCredential(client_id=fake["mi_client"])):
        kc = key_client(fake, cred)
        name = "kek-mi-%d" % int(time.time() * 1000)
        key = kc.create_rsa_key(name, size=2048)
        assert kc.get_key(name).id == key.id
    assert control(fake, "stats")["issued"]["managed_identity"] >= 2


def test_managed_hsm_oct_key():
    proc, info = start(["--hsm"])
    try:
        old = os.environ.get("REQUESTS_CA_BUNDLE")
        os.environ["REQUESTS_CA_BUNDLE"] = str(info["dir"] / "ca.pem")
        try:
            cred = secret_credential(info)
            kc = key_client(info, cred)
            key = kc.create_oct_key("hsm-kek", size=256, hardware_protected=True,
                                    key_operations=["wrapKey", "unwrapKey"])
            assert key.key_type == "oct-HSM"
            # CryptographyClient would wrap an oct key locally (with a key of its own, as the
            # JWK of an HSM key carries no `k`); the SDK's generated REST client calls the HSM.
            crypto = CryptographyClient(key.id, cred, verify_challenge_resource=False)
            params = crypto._models.KeyOperationsParameters
            dek = os.urandom(32)
            v = key.properties.version
            w = crypto._client.wrap_key(key_name="hsm-kek", key_version=v,
                                        parameters=params(algorithm=KeyWrapAlgorithm.aes_256, value=dek))
            assert w.kid == key.id and w.result != dek
            u = crypto._client.unwrap_key(key_name="hsm-kek", key_version=v,
                                          parameters=params(algorithm=KeyWrapAlgorithm.aes_256, value=w.result))
            assert u.result == dek
            stats = control(info, "stats")
            assert stats["calls"].get("wrapKey") == 1, stats
        finally:
            if old is None:
                os.environ.pop("REQUESTS_CA_BUNDLE", None)
            else:
                os.environ["REQUESTS_CA_BUNDLE"] = old
    finally:
        proc.stdin.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_challenge_resource_is_checked(fake):
    # With the check on (the default), the SDK refuses a challenge whose resource is not the
    # vault host's parent domain, as it would for a vault reached by IP address.
    kc = KeyClient(vault(fake), secret_credential(fake))
    with pytest.raises(ValueError, match="does not match the requested domain"):
        kc.get_key("anything")


def test_strictness(fake):
    control(fake, "key", {"name": "strict", "action": "create"})
    status, headers, body = raw(fake, "GET", "/keys/strict/?api-version=7.6")
    assert status == 401 and body["error"]["code"] == "Unauthorized"
    chal = headers.get("WWW-Authenticate")
    assert chal == ('Bearer authorization="https://login.microsoftonline.com/%s", '
                    'resource="https://vault.azure.net"' % fake["tenant"]), chal
    good = secret_credential(fake).get_token("https://vault.azure.net/.default").token
    status, _, body = raw(fake, "GET", "/keys/strict/?api-version=2016-10-01",
                          headers={"Authorization": "Bearer " + good})
    assert status == 400 and body["error"]["code"] == "BadParameter"
    status, _, body = raw(fake, "GET", "/keys/strict/?api-version=7.6",
                          headers={"Authorization": "Bearer " + good})
    assert status == 200 and body["key"]["kty"] == "RSA"
    # A token for another resource: Entra ID refuses a scope the stand-in does not serve...
    with pytest.raises(ClientAuthenticationError):
        secret_credential(fake).get_token("https://storage.azure.com/.default")
    # ...and a forged or tampered token is refused by Key Vault.
    head, claims, sig = good.split(".")
    c = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    c["aud"] = "https://storage.azure.com"
    forged = ".".join([head, base64.urlsafe_b64encode(json.dumps(c).encode()).rstrip(b"=").decode(), sig])
    status, _, body = raw(fake, "GET", "/keys/strict/?api-version=7.6", headers={"Authorization": "Bearer " + forged})
    assert status == 401 and body["error"]["code"] == "Unauthorized"
    # Expired tokens are refused.
    control(fake, "token-ttl", {"seconds": 1})
    try:
        short = ClientSecretCredential(fake["tenant"], fake["sp_client"],
                                       (fake["dir"] / "client-secret").read_text(),
                                       authority=authority(fake), disable_instance_discovery=True
                                       ).get_token("https://vault.azure.net/.default").token
    finally:
        control(fake, "token-ttl", {"seconds": 3600})
    deadline = time.time() + 5
    while True:
        status, _, body = raw(fake, "GET", "/keys/strict/?api-version=7.6", headers={"Authorization": "Bearer " + short})
        if status == 401 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert status == 401 and "expired" in body["error"]["message"]
    # A wrong client secret gets Entra ID's answer.
    with pytest.raises(ClientAuthenticationError, match="AADSTS7000215"):
        secret_credential(fake, secret="wrong").get_token("https://vault.azure.net/.default")
    # Unknown body fields are refused.
    status, _, body = raw(fake, "POST", "/keys/strict//wrapkey?api-version=7.6",
                          {"alg": "RSA-OAEP-256", "value": "AAAA", "plaintext": "x"},
                          headers={"Authorization": "Bearer " + good})
    assert status == 400 and body["error"]["code"] == "BadParameter"
