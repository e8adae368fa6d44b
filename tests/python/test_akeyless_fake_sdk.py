"""Proves the fake Akeyless server (tests/fakes/akeyless_fake.py) speaks the real wire format: the
official Akeyless Python SDK completes auth (access key and Universal Identity), encrypt, decrypt,
describe-item, rotate-key and uid-rotate-token against it, and sees errors where the real API gives
them. It also pins the fake's strictness: errors are exactly {"error": "..."}, `uid_token` is refused,
HTTPS works with the generated test CA (and fails without it), AWS cloud-ids signed with botocore the way
the official helper signs them are accepted and tampered ones refused, k8s auth needs gateway mode, and
cloud tokens need the right audience.

Skipped (not failed) only when KMS_TEST_OPT_OUT names `akeyless-sdk`.
"""

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

OPT_OUT = "akeyless-sdk" in os.environ.get("KMS_TEST_OPT_OUT", "").split(",")
try:
    import akeyless
    from akeyless.rest import ApiException
except ImportError:  # pragma: no cover - depends on the environment
    if OPT_OUT:
        pytest.skip("akeyless-sdk opted out (KMS_TEST_OPT_OUT)", allow_module_level=True)
    raise

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "akeyless_fake.py"
ACCESS_ID = "p-sdkproof"
ACCESS_KEY = "sdk-proof-access-key-0123456789"
KEY = "/k8s/kms-kek"


@pytest.fixture(scope="module")
def fake():
    env = dict(os.environ, FAKE_AKEYLESS_ACCESS_KEY=ACCESS_KEY)
    proc = subprocess.Popen(
        [sys.executable, str(FAKE), "--port", "0", "--access-id", ACCESS_ID, "--key", KEY, "--exit-on-stdin-eof"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("PORT "), "fake did not start: %r" % line
    url = "http://127.0.0.1:%d" % int(line.split()[1])
    yield url
    proc.stdin.close()
    proc.terminate()
    proc.wait(timeout=10)


def control(url, action, body=None):
    req = urllib.request.Request(
        url + "/__control/" + action,
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return json.loads(resp.read() or b"{}")


def api_for(url):
    return akeyless.V2Api(akeyless.ApiClient(akeyless.Configuration(host=url)))


@pytest.fixture(params=["", "/api/v2"], ids=["root", "gateway-prefix"])
def api(fake, request):
    return api_for(fake + request.param)


def access_key_token(api):
    out = api.auth(akeyless.Auth(access_id=ACCESS_ID, access_key=ACCESS_KEY, access_type="access_key"))
    assert isinstance(out, akeyless.AuthOutput)
    assert out.token.startswith("t-")
    assert out.expiration
    return out.token


def test_auth_access_key(api):
    access_key_token(api)


def test_auth_wrong_access_key_and_unknown_access_id(api):
    for access_id, key in [(ACCESS_ID, "wrong"), ("p-unknown", ACCESS_KEY)]:
        with pytest.raises(ApiException) as e:
            api.auth(akeyless.Auth(access_id=access_id, access_key=key))
        assert e.value.status == 401
        assert "error" in json.loads(e.value.body)


def test_encrypt_decrypt_round_trip_base64_and_context(api):
    token = access_key_token(api)
    secret = os.urandom(32)
    ctx = {"cluster": "sdk-proof"}
    enc = api.encrypt(
        akeyless.Encrypt(
            key_name=KEY,
            plaintext=base64.b64encode(secret).decode(),
            input_format="base64",
            encryption_context=ctx,
            token=token,
        )
    )
    assert isinstance(enc, akeyless.EncryptOutput) and enc.result
    dec = api.decrypt(
        akeyless.Decrypt(
            key_name=KEY, ciphertext=enc.result, output_format="base64", encryption_context=ctx, token=token
        )
    )
    assert isinstance(dec, akeyless.DecryptOutput)
    assert base64.b64decode(dec.result) == secret
    # The context is bound: another context is refused.
    with pytest.raises(ApiException) as e:
        api.decrypt(
            akeyless.Decrypt(
                key_name=KEY, ciphertext=enc.result, output_format="base64",
                encryption_context={"cluster": "other"}, token=token,
            )
        )
    assert e.value.status == 400
    # Text plaintext without input-format, as the SDK's defaults send it.
    enc = api.encrypt(akeyless.Encrypt(key_name=KEY, plaintext="hello", token=token))
    assert api.decrypt(akeyless.Decrypt(key_name=KEY, ciphertext=enc.result, token=token)).result == "hello"


def test_describe_item_and_rotate_key(api):
    token = access_key_token(api)
    item = api.describe_item(akeyless.DescribeItem(name=KEY, token=token, show_versions=True))
    assert isinstance(item, akeyless.Item)
    assert item.item_name == KEY and item.item_type == "AES256GCM"
    assert item.is_enabled is True and isinstance(item.item_id, int)
    before = item.last_version
    assert [v.version for v in item.item_versions] == list(range(1, before + 1))
    assert item.creation_date is not None  # parsed into a datetime by the SDK

    old = api.encrypt(akeyless.Encrypt(key_name=KEY, plaintext="b2xk", input_format="base64", token=token)).result
    rot = api.rotate_key(akeyless.RotateKey(name=KEY, token=token))
    assert isinstance(rot, akeyless.RotateKeyOutput)
    assert rot.new_item_version == before + 1
    assert api.describe_item(akeyless.DescribeItem(name=KEY, token=token)).last_version == before + 1
    # Data encrypted before the rotation still decrypts.
    out = api.decrypt(akeyless.Decrypt(key_name=KEY, ciphertext=old, output_format="base64", token=token))
    assert base64.b64decode(out.result) == b"old"


def test_universal_identity_auth_and_rotation(fake):
    api = api_for(fake)
    init = control(fake, "uid-token", {"ttl": 3600})["token"]
    assert init.startswith("u-")
    out = api.auth(akeyless.Auth(access_type="universal_identity", uid_token=init))
    assert out.token.startswith("t-")
    rotated = api.uid_rotate_token(akeyless.UidRotateToken(uid_token=init))
    assert isinstance(rotated, akeyless.UidRotateTokenOutput)
    assert rotated.token.startswith("u-") and rotated.token != init
    # The old token is consumed, the new one works.
    with pytest.raises(ApiException) as e:
        api.auth(akeyless.Auth(access_type="universal_identity", uid_token=init))
    assert e.value.status == 401
    assert api.auth(akeyless.Auth(access_type="universal_identity", uid_token=rotated.token)).token.startswith("t-")


def test_errors_for_disabled_missing_and_denied_keys(fake):
    api = api_for(fake)
    token = access_key_token(api)
    name = "/k8s/errors"
    control(fake, "key", {"name": name, "action": "create"})
    for action, status in [("disable", 400), ("enable", 200), ("deny", 403), ("allow", 200), ("delete", 404)]:
        control(fake, "key", {"name": name, "action": action})
        req = akeyless.Encrypt(key_name=name, plaintext="eA==", input_format="base64", token=token)
        if status == 200:
            assert api.encrypt(req).result
            continue
        with pytest.raises(ApiException) as e:
            api.encrypt(req)
        assert e.value.status == status, action
    control(fake, "expire-tokens")
    with pytest.raises(ApiException) as e:
        api.describe_item(akeyless.DescribeItem(name=KEY, token=token))
    assert e.value.status == 401


# -- strictness -------------------------------------------------------------------------------------

AWS_KEY_ID = "AKIDSDKPROOF"
AWS_SECRET = "sdk-proof-aws-secret/0123456789"


def start_fake(*extra):
    env = dict(os.environ, FAKE_AKEYLESS_ACCESS_KEY=ACCESS_KEY, FAKE_AKEYLESS_AWS_SECRET=AWS_SECRET)
    proc = subprocess.Popen(
        [sys.executable, str(FAKE), "--port", "0", "--access-id", ACCESS_ID, "--key", KEY,
         "--aws-access-key-id", AWS_KEY_ID, "--exit-on-stdin-eof", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("PORT "), "fake did not start: %r" % line
    return proc, int(line.split()[1])


def stop(proc):
    proc.stdin.close()
    proc.terminate()
    proc.wait(timeout=10)


def test_errors_are_exactly_an_error_string(fake):
    api = api_for(fake)
    token = access_key_token(api)
    calls = [
        lambda: api.auth(akeyless.Auth(access_id=ACCESS_ID, access_key="wrong")),
        lambda: api.describe_item(akeyless.DescribeItem(name="/no/such", token=token)),
        lambda: api.decrypt(akeyless.Decrypt(key_name=KEY, ciphertext="bm90LWEtY2lwaGVydGV4dA==", token=token)),
        lambda: api.describe_item(akeyless.DescribeItem(name=KEY, token="t-bogus")),
    ]
    for call in calls:
        with pytest.raises(ApiException) as e:
            call()
        body = json.loads(e.value.body)
        assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"], body


def test_old_uid_token_spelling_is_refused(fake):
    init = control(fake, "uid-token", {"ttl": 3600})["token"]
    req = urllib.request.Request(
        fake + "/auth", data=json.dumps({"access-type": "universal_identity", "uid_token": init}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 401


def test_https_with_a_test_ca(tmp_path):
    proc, port = start_fake("--tls-dir", str(tmp_path))
    try:
        url = "https://127.0.0.1:%d" % port
        conf = akeyless.Configuration(host=url)
        conf.ssl_ca_cert = str(tmp_path / "ca.pem")
        assert access_key_token(akeyless.V2Api(akeyless.ApiClient(conf))).startswith("t-")
        plain = akeyless.Configuration(host=url)
        plain.retries = 0
        with pytest.raises(Exception) as e:
            access_key_token(akeyless.V2Api(akeyless.ApiClient(plain)))
        assert "CERTIFICATE_VERIFY_FAILED" in str(e.value) or "SSL" in str(e.value)
    finally:
        stop(proc)


def aws_cloud_id(secret, url="https://sts.amazonaws.com/", region="us-east-1"):
    """An aws_iam cloud-id built the way the official helper builds it: a signed, unsent STS call."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    body = "Action=GetCallerIdentity&Version=2011-06-15"
    req = AWSRequest(method="POST", url=url, data=body,
                     headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    SigV4Auth(Credentials(AWS_KEY_ID, secret), "sts", region).add_auth(req)
    headers = {k: [v] for k, v in req.headers.items()}
    doc = {
        "sts_request_method": "POST",
        "sts_request_url": base64.b64encode(url.encode()).decode(),
        "sts_request_body": base64.b64encode(body.encode()).decode(),
        "sts_request_headers": base64.b64encode(json.dumps(headers).encode()).decode(),
    }
    return base64.b64encode(json.dumps(doc).encode()).decode()


def test_aws_cloud_id_signature_is_verified():
    pytest.importorskip("botocore")
    proc, port = start_fake()
    try:
        api = api_for("http://127.0.0.1:%d" % port)
        for url, region in [("https://sts.amazonaws.com/", "us-east-1"),
                            ("https://sts.cn-north-1.amazonaws.com.cn/", "cn-north-1")]:
            out = api.auth(akeyless.Auth(access_id=ACCESS_ID, access_type="aws_iam",
                                         cloud_id=aws_cloud_id(AWS_SECRET, url, region)))
            assert out.token.startswith("t-")
        for bad in [aws_cloud_id("wrong-secret"),
                    aws_cloud_id(AWS_SECRET, "https://sts.eu-west-1.amazonaws.com/", "us-east-1"),
                    base64.b64encode(b"not json").decode(), "cloud-id"]:
            with pytest.raises(ApiException) as e:
                api.auth(akeyless.Auth(access_id=ACCESS_ID, access_type="aws_iam", cloud_id=bad))
            assert e.value.status in (400, 401)
    finally:
        stop(proc)


def jwt(claims):
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return "%s.%s.c2ln" % (enc({"alg": "RS256"}), enc(claims))


def test_k8s_only_through_a_gateway_and_cloud_tokens_need_their_audience():
    sa = base64.b64encode(jwt({"sub": "system:serviceaccount:kube-system:kms"}).encode()).decode()
    k8s = akeyless.Auth(access_id=ACCESS_ID, access_type="k8s", k8s_auth_config_name="c1",
                        k8s_service_account_token=sa)
    saas, port = start_fake("--k8s-auth-config", "c1")
    gw, gw_port = start_fake("--gateway", "--k8s-auth-config", "c1")
    try:
        with pytest.raises(ApiException) as e:
            api_for("http://127.0.0.1:%d" % port).auth(k8s)
        assert "Gateway" in json.loads(e.value.body)["error"]
        gw_api = api_for("http://127.0.0.1:%d/api/v2" % gw_port)
        assert gw_api.auth(k8s).token.startswith("t-")
        api = api_for("http://127.0.0.1:%d" % port)
        good = base64.b64encode(jwt({"aud": "akeyless.io"}).encode()).decode()
        assert api.auth(akeyless.Auth(access_id=ACCESS_ID, access_type="gcp", cloud_id=good)).token
        wrong = base64.b64encode(jwt({"aud": "someone-else"}).encode()).decode()
        with pytest.raises(ApiException):
            api.auth(akeyless.Auth(access_id=ACCESS_ID, access_type="gcp", cloud_id=wrong))
        azure = base64.b64encode(jwt({"aud": "https://management.azure.com/"}).encode()).decode()
        assert api.auth(akeyless.Auth(access_id=ACCESS_ID, access_type="azure_ad", cloud_id=azure)).token
    finally:
        stop(saas)
        stop(gw)


def test_a_proxy_answer_is_not_an_akeyless_error(fake):
    api = api_for(fake)
    token = access_key_token(api)
    control(fake, "fail", {"command": "describe-item", "status": 404, "count": 1,
                           "body": "<html><body>Not Found</body></html>", "content_type": "text/html"})
    with pytest.raises(ApiException) as e:
        api.describe_item(akeyless.DescribeItem(name=KEY, token=token))
    assert e.value.status == 404 and e.value.body.startswith("<html>")
    assert api.describe_item(akeyless.DescribeItem(name=KEY, token=token)).item_name == KEY


def test_cert_challenge_flow(tmp_path):
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    proc, port = start_fake()
    try:
        subprocess.run([sys.executable, str(FAKE), "--make-certs", str(tmp_path)], check=True)
        api = api_for("http://127.0.0.1:%d" % port)
        cert_b64 = base64.b64encode((tmp_path / "client.pem").read_bytes()).decode()
        key = serialization.load_pem_private_key((tmp_path / "client-key.pem").read_bytes(), None)
        challenge = api.get_cert_challenge(akeyless.GetCertChallenge(access_id=ACCESS_ID, cert_data=cert_b64)).challenge
        signed = base64.b64encode(key.sign(base64.b64decode(challenge), ec.ECDSA(hashes.SHA256()))).decode()
        auth = akeyless.Auth(access_id=ACCESS_ID, access_type="cert", cert_data=cert_b64,
                             cert_challenge=challenge, signed_cert_challenge=signed)
        assert api.auth(auth).token.startswith("t-")
        with pytest.raises(ApiException) as e:  # a challenge is single-use
            api.auth(auth)
        assert e.value.status == 401
        other = ec.generate_private_key(ec.SECP256R1())
        challenge = api.get_cert_challenge(akeyless.GetCertChallenge(access_id=ACCESS_ID, cert_data=cert_b64)).challenge
        forged = base64.b64encode(other.sign(base64.b64decode(challenge), ec.ECDSA(hashes.SHA256()))).decode()
        with pytest.raises(ApiException) as e:
            api.auth(akeyless.Auth(access_id=ACCESS_ID, access_type="cert", cert_data=cert_b64,
                                   cert_challenge=challenge, signed_cert_challenge=forged))
        assert e.value.status == 401
    finally:
        stop(proc)


def uid_auth(api, token):
    return api.auth(akeyless.Auth(access_type="universal_identity", uid_token=token))


def test_universal_identity_token_tree(fake):
    """The generator model: a root token per auth method, one child per node, two-phase rotation,
    listing, revocation and reset-on-generate, all driven by the SDK's own request models."""
    api = api_for(fake)
    admin = access_key_token(api)
    root = control(fake, "uid-method", {"name": "/kms/generator", "ttl": 60})["token"]
    child = api.uid_create_child_token(akeyless.UidCreateChildToken(
        uid_token=root, child_ttl=30, child_deny_rotate=False, child_deny_inheritance=True,
        description="kms-plugin node cp-1"))
    assert isinstance(child, akeyless.UidCreateChildTokenOutput)
    assert uid_auth(api, child.token).token.startswith("t-")
    # deny-inheritance: the child cannot make children.
    with pytest.raises(ApiException) as e:
        api.uid_create_child_token(akeyless.UidCreateChildToken(uid_token=child.token))
    assert e.value.status == 403 and json.loads(e.value.body)["error"]

    tree = api.uid_list_children(akeyless.UidListChildren(uid_token=root))
    assert isinstance(tree, akeyless.UniversalIdentityDetails)
    assert tree.number_of_tokens == 2
    (node,) = tree.root.children.values()
    assert node.ttl == 30 and node.comment == "kms-plugin node cp-1" and node.deny_inheritance
    assert node.expired_date and not node.last_rotate

    # Two-phase rotation: the old token stays valid until the ack, a repeated ack is harmless.
    new = api.uid_rotate_token(akeyless.UidRotateToken(uid_token=child.token, with_manual_ack=True)).token
    assert uid_auth(api, child.token).token and uid_auth(api, new).token
    api.uid_rotate_token(akeyless.UidRotateToken(uid_token=child.token, send_manual_ack_token=new))
    api.uid_rotate_token(akeyless.UidRotateToken(uid_token=child.token, send_manual_ack_token=new))
    with pytest.raises(ApiException) as e:
        uid_auth(api, child.token)
    assert e.value.status == 401
    listed = api.uid_list_children(akeyless.UidListChildren(uid_token=new))
    assert listed.root.id == node.id and listed.root.last_rotate

    # fork: a fresh child, the caller keeps its token.
    forked = api.uid_rotate_token(akeyless.UidRotateToken(uid_token=root, fork=True)).token
    assert uid_auth(api, forked).token and uid_auth(api, root).token

    # Revoke one node; the rest of the tree lives on.
    api.uid_revoke_token(akeyless.UidRevokeToken(uid_token=root, revoke_token=node.id, revoke_type="revokeSelf"))
    with pytest.raises(ApiException) as e:
        uid_auth(api, new)
    assert e.value.status == 401
    assert uid_auth(api, forked).token

    # uid-generate-token resets the method: the old root and its children are gone.
    fresh = api.uid_generate_token(akeyless.UidGenerateToken(auth_method_name="/kms/generator", token=admin))
    assert isinstance(fresh, akeyless.UidGenerateTokenOutput) and fresh.token != root
    for old in (root, forked):
        with pytest.raises(ApiException) as e:
            uid_auth(api, old)
        assert e.value.status == 401
    assert uid_auth(api, fresh.token).token


def test_universal_identity_ttl_is_enforced(fake):
    api = api_for(fake)
    root = control(fake, "uid-method", {"name": "/kms/ttl", "ttl": 5})["token"]
    child = api.uid_create_child_token(akeyless.UidCreateChildToken(uid_token=root, child_ttl=1)).token
    control(fake, "uid-clock", {"advance": 90})
    with pytest.raises(ApiException) as e:
        uid_auth(api, child)
    assert e.value.status == 401
    # The root (5 minutes) is still alive and a rotation renews its TTL.
    renewed = api.uid_rotate_token(akeyless.UidRotateToken(uid_token=root)).token
    control(fake, "uid-clock", {"advance": 250})
    assert uid_auth(api, renewed).token
    with pytest.raises(ApiException) as e:
        api.auth(akeyless.Auth(access_type="universal_identity", uid_token=None))
    assert e.value.status == 401


def test_universal_identity_accepts_only_the_current_spelling(fake):
    root = control(fake, "uid-method", {"name": "/kms/spelling", "ttl": 60})["token"]
    for field, status in [("uid_token", 401), ("uid-token", 200)]:
        req = urllib.request.Request(
            fake + "/auth",
            data=json.dumps({"access-type": "universal_identity", field: root}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                got, body = resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            got, body = e.code, json.loads(e.read())
        assert got == status, (field, body)
        assert ("error" in body) == (status != 200)
