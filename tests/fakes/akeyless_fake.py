#!/usr/bin/env python3
"""A fake Akeyless API server for tests. Loopback only.

It speaks the wire format of the real API, and is as strict as it: every command is
`POST <prefix>/<command>` with a JSON body (any path prefix, e.g. /api/v2, is accepted), credentials
travel in the body (`token`, `uid-token`; the old `uid_token` spelling is refused), and every error is
exactly `{"error": "..."}` with the real status and no other field (an unknown path answers Go's plain
`404 page not found`, as the real server does). Implemented commands: auth (access_key,
universal_identity, k8s, cert, jwt, aws_iam/azure_ad/gcp), encrypt, decrypt, describe-item, rotate-key,
create-dfc-key (AES keys only), list-items (minimal), and a Universal Identity token tree:
uid-generate-token, uid-rotate-token (with-manual-ack, send-manual-ack-token, fork),
uid-create-child-token, uid-list-children, uid-revoke-token (see the UID section).

Logins are checked, not just looked at:
  aws_iam    base64 JSON {sts_request_method, sts_request_url, sts_request_body, sts_request_headers};
             a GetCallerIdentity POST to an STS endpoint, SigV4-signed (verified with botocore) by the
             access key given with --aws-access-key-id/--aws-secret-access-key for the region the URL
             names, signed within the last 15 minutes
  azure_ad   base64 of a JWT whose `aud` is https://management.azure.com/
  gcp        base64 of a JWT whose `aud` is the request's gcp-audience
  k8s        only in --gateway mode (the SaaS refuses it): a configured --k8s-auth-config name and a
             base64 service-account JWT (sub system:serviceaccount:...)
  cert       cert-data plus either a signed challenge from /get-cert-challenge (SHA-256, RSA PKCS#1
             v1.5 or ECDSA, verified against the certificate; single use) or key-data, the matching
             private key (older clients; --no-cert-challenge makes the server not offer the challenge)
  jwt        a JWT (three base64url parts, JSON header and claims), not expired

TLS: `--tls-dir DIR` serves HTTPS with DIR/server.pem and DIR/server-key.pem, issued by DIR/ca.pem;
`--make-certs DIR` writes those plus client pairs (client.pem/client-key.pem with EC P-256,
client-rsa.pem/client-rsa-key.pem with RSA) and exits;
`--require-client-cert` asks for a client certificate issued by DIR/ca.pem (mutual TLS).

Cryptography is real: AES-256-GCM per key version, the version travels inside the ciphertext, and the
encryption context is bound as associated data, so old ciphertexts decrypt after rotation and a wrong
context is refused.

Control API for tests (JSON in, JSON out):
  GET  /__control/stats                 calls per command, auth records (access types, cloud ids)
  POST /__control/reset-stats
  POST /__control/fail      {"command": "encrypt"|"*", "status": 503, "count": 2, "body": ...,
                             "content_type": "text/plain"}   next `count` calls fail (count -1 =
                             until cleared): no body = an Akeyless error {"error": "injected ..."};
                             a string body is sent as it is with content_type (what a proxy, an
                             ingress or a WAF in front of Akeyless answers: HTML, empty, text); a
                             JSON body is sent as that JSON
  POST /__control/clear-faults          drop every injected failure and latency
  POST /__control/latency   {"command": "*", "seconds": 1.5, "count": 1}  (count -1 = until cleared)
  POST /__control/expire-tokens         every issued `t-` token becomes invalid
  POST /__control/token-ttl {"seconds": 2, "expiration_format": "rfc3339"|"go"|"unix"|"none"}
  POST /__control/key       {"name": "k", "action": "create"|"disable"|"enable"|"delete"|"rotate"|
                             "deny"|"allow"|"delete-version", "version": 1, "type": "AES256GCM"
                             (or "CLASSIC_KEY" with "key_type": "AES256GCM"|"RSA2048"...)}
  POST /__control/uid-token {"ttl": 3600}  → {"token": "u-..."} root token of a new auth method (ttl s)
  POST /__control/uid-method {"name": "/m", "ttl": 60} → {"token", "access_id"} method + root (ttl min)
  POST /__control/uid-expire            every UID token becomes invalid
  GET  /__control/uid-tokens            → {"valid": n} number of live UID token values
  POST /__control/uid-valid {"token": "u-..."} → {"valid": bool}
  POST /__control/uid-clock {"advance": 30}  move the UID clock forward (seconds)
  POST /__control/drop      {"command": "uid-rotate-token", "count": 1}  apply, then drop the answer
  POST /__control/stall     {"phase": "rotate"|"ack", "seconds": 30, "count": 1}  hold a rotation's
                             answer after applying it ("rotate"), or hold an ack before applying it
  POST /__control/uid-clear-faults      forget pending drops and stalls
  POST /__control/uid-manual-ack {"supported": false}  behave like a server without two-phase rotation

Start: `akeyless_fake.py --port 0 [--port-file F] [--access-id p-x --access-key K] [--key NAME]...`;
the first line on stdout is `PORT <n>`.
"""

import argparse
import base64
import datetime
import ipaddress
import json
import os
import secrets
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.x509.oid import NameOID

try:  # moto brings botocore; without it AWS signatures cannot be checked and aws_iam is refused
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
except ImportError:  # pragma: no cover - depends on the environment
    SigV4Auth = None

MAGIC = b"FAK1"


def now():
    return time.time()


def fmt_time(ts, style):
    dt = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    if style == "go":
        return dt.strftime("%Y-%m-%d %H:%M:%S.%f +0000 UTC")
    if style == "unix":
        return str(int(ts))
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    """An Akeyless error: answered as exactly {"error": text}. `raw` bodies are sent as they are."""

    def __init__(self, status, error, message=None, raw=None, content_type="application/json"):
        super().__init__(error)
        self.status = status
        self.error = error if not message else "%s: %s" % (error, message)
        self.raw = raw
        self.content_type = content_type


AZURE_AUDIENCES = ("https://management.azure.com/", "https://management.azure.com")
STS_BODY = b"Action=GetCallerIdentity&Version=2011-06-15"


def b64url(data):
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))


def jwt_claims(token, what):
    """Header and claims of a JWT-shaped token (the signature is the issuer's business)."""
    parts = token.strip().split(".") if isinstance(token, str) else []
    if len(parts) != 3 or not all(parts[:2]):
        raise ApiError(401, "failed to authenticate: %s is not a JWT" % what)
    try:
        header = json.loads(b64url(parts[0]))
        claims = json.loads(b64url(parts[1]))
    except Exception:
        raise ApiError(401, "failed to authenticate: %s is not a JWT" % what)
    if not isinstance(header, dict) or "alg" not in header or not isinstance(claims, dict):
        raise ApiError(401, "failed to authenticate: %s is not a JWT" % what)
    exp = claims.get("exp")
    if isinstance(exp, (int, float)) and exp < now():
        raise ApiError(401, "failed to authenticate: %s has expired" % what)
    return claims


def sts_region(host):
    """Signing region of an STS host; None if it is not an STS endpoint."""
    host = host.lower()
    if host in ("sts.amazonaws.com",):
        return "us-east-1"
    for suffix in (".amazonaws.com.cn", ".amazonaws.com"):
        if host.startswith("sts.") and host.endswith(suffix):
            region = host[len("sts."):-len(suffix)]
            if region and "." not in region:
                return region
    return None


class Key:
    def __init__(self, name, item_id, item_type="AES256GCM", classic_type=None):
        self.name = name
        self.item_id = item_id
        # DFC keys carry their algorithm in item_type; Classic keys say CLASSIC_KEY there and carry
        # it in item_general_info.classic_key_details.key_type.
        self.item_type = item_type
        self.classic_type = classic_type
        self.versions = {1: AESGCM.generate_key(bit_length=256)}
        self.enabled = True
        self.deleted = False
        self.denied = False
        self.created = now()
        self.rotated = None

    @property
    def last_version(self):
        return max(self.versions)


class State:
    def __init__(self, args):
        self.lock = threading.Lock()
        self.access_keys = {}  # access id → access key
        if args.access_id and args.access_key:
            self.access_keys[args.access_id] = args.access_key
        self.keys = {}
        self.next_item_id = 1000
        for name in args.key or []:
            self.create_key(name)
        self.tokens = {}  # t- token → {"exp": ts, "access_id": ..., "access_type": ...}
        self.uid = UidTree(args.uid_minute_seconds)
        self.token_ttl = args.token_ttl
        self.expiration_format = args.expiration_format
        self.calls = {}
        self.auth_records = []
        self.failures = []  # [{"command", "status", "count", "body", "content_type"}]
        self.gateway = args.gateway
        self.cert_challenge = not args.no_cert_challenge
        self.challenges = {}  # challenge → (certificate fingerprint, expiry)
        self.k8s_configs = set(args.k8s_auth_config or [])
        self.aws_keys = {}  # access key id → secret
        if args.aws_access_key_id and args.aws_secret_access_key:
            self.aws_keys[args.aws_access_key_id] = args.aws_secret_access_key
        self.latencies = []  # [{"command", "seconds", "count"}]

    def create_key(self, name, item_type="AES256GCM", classic_type=None):
        self.next_item_id += 1
        self.keys[name] = Key(name, self.next_item_id, item_type, classic_type)
        return self.keys[name]

    def issue_token(self, access_id, access_type):
        tok = "t-" + secrets.token_hex(16)
        exp = now() + self.token_ttl
        self.tokens[tok] = {"exp": exp, "access_id": access_id, "access_type": access_type}
        out = {"token": tok}
        if self.expiration_format != "none":
            out["expiration"] = fmt_time(exp, self.expiration_format)
        out["creds"] = {"access_id": access_id, "expiry": int(exp)} if self.expiration_format != "none" else {}
        return out


def b64d(value, what):
    try:
        return base64.b64decode(value, validate=True)
    except Exception:
        raise ApiError(400, "failed to decode %s: illegal base64 data" % what)


class Api:
    def __init__(self, state):
        self.s = state

    # -- helpers -----------------------------------------------------------------------------------
    def require_token(self, body):
        tok = body.get("token")
        if not tok and body.get("uid-token"):
            node = self.s.uid.find(body["uid-token"])
            if node is None:
                raise ApiError(401, "Unauthorized", "uid token is invalid or expired")
            return {"access_id": self.s.uid.methods[node.method]["access_id"],
                    "access_type": "universal_identity", "uid_node": node}
        info = self.s.tokens.get(tok) if isinstance(tok, str) else None
        if info is None or info["exp"] < now():
            raise ApiError(401, "Unauthorized", "auth token is expired or invalid")
        return info

    def find_key(self, name, for_crypto):
        key = self.s.keys.get(name) if isinstance(name, str) else None
        if key is None or key.deleted:
            raise ApiError(404, "failed to get item: item not found", "Item %s not found" % name)
        if key.denied:
            raise ApiError(403, "Unauthorized: access denied", "permission denied to item %s" % name)
        if for_crypto and not key.enabled:
            raise ApiError(400, "key is disabled")
        return key

    @staticmethod
    def aad(header, ctx):
        if ctx is None:
            ctx = {}
        if not isinstance(ctx, dict) or not all(isinstance(v, str) for v in ctx.values()):
            raise ApiError(400, "encryption-context must be a map of strings")
        return header + json.dumps(ctx, sort_keys=True, separators=(",", ":")).encode()

    # -- commands ----------------------------------------------------------------------------------
    def auth(self, body):
        access_type = body.get("access-type") or "access_key"
        access_id = body.get("access-id")
        record = {"access_type": access_type, "access_id": access_id}
        uid_node = None
        if access_type == "access_key":
            if access_id not in self.s.access_keys:
                raise ApiError(401, "failed to authenticate: access id %s not found" % access_id)
            if not secrets.compare_digest(str(body.get("access-key") or ""), self.s.access_keys[access_id]):
                raise ApiError(401, "failed to authenticate: access key is invalid")
        elif access_type == "universal_identity":
            access_id, uid_node = uid_auth(self, body)
        elif access_type == "k8s":
            if not self.s.gateway:
                raise ApiError(400, "failed to authenticate: k8s auth is supported only through an Akeyless Gateway")
            name = body.get("k8s-auth-config-name")
            if name not in self.s.k8s_configs:
                raise ApiError(404, "failed to authenticate: k8s auth config %s not found" % name)
            raw = b64d(body.get("k8s-service-account-token") or "", "k8s-service-account-token")
            claims = jwt_claims(raw.decode("utf-8", "replace"), "k8s-service-account-token")
            if not str(claims.get("sub", "")).startswith("system:serviceaccount:"):
                raise ApiError(401, "failed to authenticate: not a service account token")
            record["k8s_auth_config_name"] = name
        elif access_type == "cert":
            record["cert_flow"] = self.check_cert(body)
        elif access_type == "jwt":
            jwt_claims(body.get("jwt"), "jwt")
        elif access_type in ("aws_iam", "azure_ad", "gcp"):
            cloud_id = body.get("cloud-id")
            if not isinstance(cloud_id, str) or not cloud_id:
                raise ApiError(400, "failed to authenticate: cloud-id is required")
            record["cloud_id"] = cloud_id
            raw = b64d(cloud_id, "cloud-id")
            if access_type == "aws_iam":
                record["sts"] = self.check_aws(raw)
            elif access_type == "azure_ad":
                claims = jwt_claims(raw.decode("utf-8", "replace"), "cloud-id")
                if claims.get("aud") not in AZURE_AUDIENCES:
                    raise ApiError(401, "failed to authenticate: azure token audience %r" % claims.get("aud"))
                record["claims"] = claims
            else:
                audience = body.get("gcp-audience") or "akeyless.io"
                claims = jwt_claims(raw.decode("utf-8", "replace"), "cloud-id")
                if claims.get("aud") != audience:
                    raise ApiError(401, "failed to authenticate: gcp token audience %r, expected %r"
                                   % (claims.get("aud"), audience))
                record["gcp_audience"] = body.get("gcp-audience")
                record["claims"] = claims
        else:
            raise ApiError(400, "unsupported access type %s" % access_type)
        if access_type != "universal_identity" and not access_id:
            raise ApiError(400, "access-id is required")
        self.s.auth_records.append(record)
        out = self.s.issue_token(access_id, access_type)
        if uid_node is not None:
            self.s.tokens[out["token"]]["uid_node"] = uid_node
        return out

    @staticmethod
    def load_cert(body):
        try:
            cert = x509.load_pem_x509_certificate(b64d(body.get("cert-data") or "", "cert-data"))
        except ApiError:
            raise
        except Exception:
            raise ApiError(401, "failed to authenticate: invalid certificate")
        if cert.not_valid_after_utc.timestamp() < now():
            raise ApiError(401, "failed to authenticate: certificate has expired")
        return cert

    def get_cert_challenge(self, body):
        if not self.s.cert_challenge:
            raise ApiError(404, "", raw=b"404 page not found\n", content_type="text/plain; charset=utf-8")
        cert = self.load_cert(body)
        challenge = base64.b64encode(os.urandom(32)).decode()
        self.s.challenges[challenge] = (cert.fingerprint(hashes.SHA256()), now() + 60)
        return {"challenge": challenge}

    def check_cert(self, body):
        if body.get("signed-cert-challenge") is not None:
            return self.check_signed_challenge(body)
        cert = self.load_cert(body)
        try:
            key = serialization.load_pem_private_key(b64d(body.get("key-data") or "", "key-data"), None)
        except ApiError:
            raise
        except Exception:
            raise ApiError(401, "failed to authenticate: invalid certificate or key")
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != key.public_key().public_bytes(
            serialization.Encoding.DER, spki
        ):
            raise ApiError(401, "failed to authenticate: the key does not match the certificate")
        return "key"

    def check_signed_challenge(self, body):
        """The challenge flow: a challenge we issued for this certificate, signed by its key."""
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        cert = self.load_cert(body)
        challenge = body.get("cert-challenge")
        issued = self.s.challenges.pop(challenge, None) if isinstance(challenge, str) else None
        if issued is None or issued[1] < now() or issued[0] != cert.fingerprint(hashes.SHA256()):
            raise ApiError(401, "failed to authenticate: unknown or expired certificate challenge")
        if body.get("key-data"):
            raise ApiError(400, "failed to authenticate: key-data must not be sent with a signed challenge")
        signature = b64d(body.get("signed-cert-challenge") or "", "signed-cert-challenge")
        data = base64.b64decode(challenge)
        public = cert.public_key()
        try:
            if isinstance(public, rsa.RSAPublicKey):
                public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
            elif isinstance(public, ec.EllipticCurvePublicKey):
                public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            else:
                raise ApiError(401, "failed to authenticate: unsupported certificate key type")
        except ApiError:
            raise
        except Exception:
            raise ApiError(401, "failed to authenticate: the challenge signature does not match the certificate")
        return "challenge"

    def check_aws(self, raw):
        """Decodes and verifies an aws_iam cloud-id; returns what it names."""
        try:
            doc = json.loads(raw)
            method = doc["sts_request_method"]
            url = base64.b64decode(doc["sts_request_url"], validate=True).decode()
            body = base64.b64decode(doc["sts_request_body"], validate=True)
            headers = json.loads(base64.b64decode(doc["sts_request_headers"], validate=True))
        except Exception:
            raise ApiError(401, "failed to authenticate: malformed aws cloud-id")
        if method != "POST" or body != STS_BODY:
            raise ApiError(401, "failed to authenticate: the cloud-id is not an STS GetCallerIdentity request")
        if not isinstance(headers, dict) or not all(
            isinstance(v, list) and v and all(isinstance(x, str) for x in v) for v in headers.values()
        ):
            raise ApiError(401, "failed to authenticate: sts_request_headers must map names to arrays")
        parsed = urllib.parse.urlsplit(url)
        region = sts_region(parsed.hostname or "")
        if parsed.scheme != "https" or region is None:
            raise ApiError(401, "failed to authenticate: %s is not an STS endpoint" % url)
        one = {k.lower(): v[0] for k, v in headers.items()}
        auth = one.get("authorization", "")
        fields = dict(
            part.strip().split("=", 1) for part in auth[len("AWS4-HMAC-SHA256 "):].split(",") if "=" in part
        ) if auth.startswith("AWS4-HMAC-SHA256 ") else {}
        try:
            akid, date, scope_region, service, _ = fields["Credential"].split("/")
            signed = fields["SignedHeaders"].split(";")
            signature = fields["Signature"]
            amz_date = one["x-amz-date"]
        except Exception:
            raise ApiError(401, "failed to authenticate: the STS request is not SigV4-signed")
        if scope_region != region or service != "sts":
            raise ApiError(401, "failed to authenticate: signed for %s/%s, the URL needs %s/sts"
                           % (scope_region, service, region))
        secret = self.s.aws_keys.get(akid)
        if secret is None or SigV4Auth is None:
            raise ApiError(401, "failed to authenticate: unknown AWS access key id")
        signed_at = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
        if abs(signed_at.timestamp() - now()) > 900 or not amz_date.startswith(date):
            raise ApiError(401, "failed to authenticate: the STS request signature has expired")
        req_headers = {}
        for name in signed:
            if name == "host":
                req_headers["Host"] = parsed.netloc
            elif name in one:
                req_headers[name] = one[name]
            else:
                raise ApiError(401, "failed to authenticate: signed header %s is missing" % name)
        req = AWSRequest(method="POST", url=url, data=body, headers=req_headers)
        req.context["timestamp"] = amz_date
        signer = SigV4Auth(Credentials(akid, secret, one.get("x-amz-security-token")), "sts", region)
        if set(signer.headers_to_sign(req).keys()) != set(signed):
            raise ApiError(401, "failed to authenticate: unexpected signed header set")
        want = signer.signature(signer.string_to_sign(req, signer.canonical_request(req)), req)
        if not secrets.compare_digest(want, signature):
            raise ApiError(401, "failed to authenticate: the STS request signature does not match")
        return {"url": url, "region": region, "access_key_id": akid}

    def encrypt(self, body):
        self.require_token(body)
        key = self.find_key(body.get("key-name"), True)
        plaintext = body.get("plaintext")
        if not isinstance(plaintext, str) or plaintext == "":
            raise ApiError(400, "plaintext is required")
        data = b64d(plaintext, "plaintext") if body.get("input-format") == "base64" else plaintext.encode()
        version = key.last_version
        header = MAGIC + struct.pack(">IQ", version, key.item_id)
        nonce = os.urandom(12)
        ct = AESGCM(key.versions[version]).encrypt(nonce, data, self.aad(header, body.get("encryption-context")))
        return {"result": base64.b64encode(header + nonce + ct).decode()}

    def decrypt(self, body):
        self.require_token(body)
        key = self.find_key(body.get("key-name"), True)
        blob = b64d(body.get("ciphertext") or "", "ciphertext")
        if len(blob) < 16 + 12 + 16 or blob[:4] != MAGIC:
            raise ApiError(400, "failed to decrypt", "ciphertext is malformed")
        version, item_id = struct.unpack(">IQ", blob[4:16])
        if item_id != key.item_id:
            raise ApiError(400, "failed to decrypt", "ciphertext was not produced by this key")
        if version not in key.versions:
            raise ApiError(404, "failed to decrypt", "key version %d not found" % version)
        try:
            pt = AESGCM(key.versions[version]).decrypt(
                blob[16:28], blob[28:], self.aad(blob[:16], body.get("encryption-context"))
            )
        except ApiError:
            raise
        except Exception:
            raise ApiError(400, "failed to decrypt", "authentication tag mismatch")
        if body.get("output-format") == "base64":
            return {"result": base64.b64encode(pt).decode()}
        try:
            return {"result": pt.decode()}
        except UnicodeDecodeError:
            raise ApiError(400, "failed to decrypt", "plaintext is not UTF-8; use output-format base64")

    def describe_item(self, body):
        self.require_token(body)
        key = self.find_key(body.get("name"), False)
        iso = lambda ts: fmt_time(ts, "rfc3339") if ts else None  # noqa: E731
        item = {
            "item_name": key.name,
            "item_id": key.item_id,
            "display_id": "fake%08x" % key.item_id,
            "item_type": key.item_type,
            "item_sub_type": "",
            "item_size": 256,
            "is_enabled": key.enabled,
            "item_state": "Enabled" if key.enabled else "Disabled",
            "last_version": key.last_version,
            "creation_date": iso(key.created),
            "modification_date": iso(key.rotated or key.created),
            "auto_rotate": False,
            "rotation_interval": 0,
            "delete_protection": False,
            "item_tags": [],
            "client_permissions": ["read", "list", "update", "delete", "create"],
            "with_customer_fragment": False,
        }
        if key.item_type == "CLASSIC_KEY":
            item["item_general_info"] = {"classic_key_details": {"key_type": key.classic_type,
                                                                 "gw_cluster_id": 1, "public_key": ""}}
        if key.rotated:
            item["last_rotation_date"] = iso(key.rotated)
        if body.get("show-versions"):
            item["item_versions"] = [
                {"version": v, "item_version_state": "Enabled", "creation_date": iso(key.created)}
                for v in sorted(key.versions)
            ]
        return item

    def rotate_key(self, body):
        self.require_token(body)
        key = self.find_key(body.get("name"), False)
        key.versions[key.last_version + 1] = AESGCM.generate_key(bit_length=256)
        key.rotated = now()
        return {"new_item_version": key.last_version, "item_type": key.item_type}

    def create_dfc_key(self, body):
        self.require_token(body)
        name = body.get("name")
        if not name:
            raise ApiError(400, "name is required")
        if name in self.s.keys and not self.s.keys[name].deleted:
            raise ApiError(409, "item already exists")
        key = self.s.create_key(name, body.get("alg") or "AES256GCM")
        return {"name": key.name, "fragment_results": [200]}

    def list_items(self, body):
        self.require_token(body)
        return {"items": [{"item_name": k.name, "item_id": k.item_id, "item_type": k.item_type}
                          for k in self.s.keys.values() if not k.deleted]}

    COMMANDS = {
        "auth": "auth",
        "encrypt": "encrypt",
        "decrypt": "decrypt",
        "describe-item": "describe_item",
        "rotate-key": "rotate_key",
        "create-dfc-key": "create_dfc_key",
        "get-cert-challenge": "get_cert_challenge",
        "list-items": "list_items",
    }

    # -- control -----------------------------------------------------------------------------------
    def control(self, action, body):
        s = self.s
        if action == "stats":
            return {"calls": dict(s.calls), "auth_records": list(s.auth_records)}
        if action == "reset-stats":
            s.calls.clear()
            s.auth_records.clear()
            return {}
        if action == "fail":
            s.failures.append({"command": body.get("command", "*"), "status": int(body.get("status", 503)),
                               "count": int(body.get("count", 1)), "body": body.get("body"),
                               "content_type": body.get("content_type", "application/json")})
            return {}
        if action == "latency":
            s.latencies.append({"command": body.get("command", "*"), "seconds": float(body.get("seconds", 0)),
                                "count": int(body.get("count", 1))})
            return {}
        if action == "clear-faults":
            s.failures.clear()
            s.latencies.clear()
            return {}
        if action == "expire-tokens":
            for info in s.tokens.values():
                info["exp"] = 0
            return {"expired": len(s.tokens)}
        if action == "token-ttl":
            s.token_ttl = float(body.get("seconds", s.token_ttl))
            s.expiration_format = body.get("expiration_format", s.expiration_format)
            return {}
        out = uid_control(self, action, body)
        if out is not None:
            return out
        if action == "key":
            name = body.get("name")
            act = body.get("action")
            if act == "create":
                key = s.create_key(name, body.get("type", "AES256GCM"), body.get("key_type"))
                return {"item_id": key.item_id}
            key = s.keys.get(name)
            if key is None:
                raise ApiError(404, "no such key %s" % name)
            if act == "disable":
                key.enabled = False
            elif act == "enable":
                key.enabled = True
            elif act == "delete":
                key.deleted = True
            elif act == "undelete":
                key.deleted = False
            elif act == "deny":
                key.denied = True
            elif act == "allow":
                key.denied = False
            elif act == "rotate":
                key.versions[key.last_version + 1] = AESGCM.generate_key(bit_length=256)
                key.rotated = now()
            elif act == "delete-version":
                key.versions.pop(int(body["version"]), None)
            else:
                raise ApiError(400, "unknown key action %r" % act)
            return {"last_version": key.last_version}
        raise ApiError(404, "unknown control action %r" % action)


# -- Universal Identity token tree -----------------------------------------------------------------
# Kept apart from the rest of the fake on purpose. Model (from Akeyless's docs and the SDK models):
# an auth method has one root token (`uid-generate-token` replaces it and everything under it);
# tokens make children (`uid-create-child-token`) unless denied; every token has a TTL in minutes
# that a rotation renews; `with-manual-ack` keeps the old value valid until the rotated value is
# acknowledged (`send-manual-ack-token` with `uid-token` = the old value); a value rotated away is
# refused; revoking is per token (`revokeSelf`) or per subtree (`revokeAll`). A child does not die
# with its parent: the docs say nothing about it, so the fake does not invent it.
# `--uid-minute-seconds` shrinks the TTL unit so tests can outlive TTLs in seconds.


class UidNode:
    def __init__(self, tree, method, parent, ttl_s, deny_rotate=False, deny_inheritance=False, description=""):
        tree.next_id += 1
        self.id = "uid-%06d" % tree.next_id
        self.method = method
        self.parent = parent
        self.ttl_s = float(ttl_s)
        self.deny_rotate = bool(deny_rotate)
        self.deny_inheritance = bool(deny_inheritance)
        self.description = description or ""
        self.revoked = False
        self.children = []
        self.depth = 0 if parent is None else parent.depth + 1
        self.token = tree.new_value(self)
        self.pending = None  # rotated value waiting for its ack
        self.retired = set()  # values acknowledged away (an ack retried after success is fine)
        self.expires = tree.clock() + self.ttl_s
        self.last_rotate = None
        if parent is not None:
            parent.children.append(self)

    def alive(self, tree):
        return not self.revoked and tree.clock() < self.expires


class UidTree:
    def __init__(self, minute_seconds=60.0):
        self.minute = float(minute_seconds)
        self.methods = {}  # name -> {"access_id", "ttl_min", "root"}
        self.values = {}  # live token value -> node
        self.next_id = 0
        self.offset = 0.0
        self.drops = []  # [{"command", "count"}]: apply, then drop the answer
        self.stalls = []  # [{"phase": "rotate"|"ack", "seconds", "count"}]
        self.manual_ack = True  # False: an older server that ignores with-manual-ack and the ack field

    def clock(self):
        return now() + self.offset

    def new_value(self, node):
        tok = "u-" + secrets.token_urlsafe(24)
        self.values[tok] = node
        return tok

    def add_method(self, name, ttl_min):
        if name not in self.methods:
            self.methods[name] = {"access_id": "p-uid" + secrets.token_hex(4), "ttl_min": ttl_min, "root": None}
        return self.methods[name]

    def generate(self, name, ttl_s=None):
        m = self.methods.get(name)
        if m is None:
            raise ApiError(404, "failed to generate token: auth method %s not found" % name)
        if m["root"] is not None:  # a new root token resets the method's whole tree
            self.revoke(m["root"], everything=True)
        m["root"] = UidNode(self, name, None, ttl_s if ttl_s is not None else m["ttl_min"] * self.minute)
        return m["root"]

    def find(self, value):
        """The node a presented value belongs to, if that value is still usable."""
        node = self.values.get(value) if isinstance(value, str) else None
        if node is None or not node.alive(self) or value not in (node.token, node.pending):
            return None
        return node

    def caller(self, body, api, what):
        """The token a request acts as: `uid-token`, or a `t-` token obtained with one."""
        if body.get("uid-token"):
            node = self.find(body["uid-token"])
            if node is None:
                raise ApiError(401, "failed to %s: universal identity token is invalid, expired or rotated" % what)
            return node
        info = api.require_token(body)
        node = info.get("uid_node")
        if node is None or not node.alive(self):
            raise ApiError(403, "failed to %s: the caller has no universal identity token" % what)
        return node

    def revoke(self, node, everything):
        node.revoked = True
        for v in [node.token, node.pending]:
            self.values.pop(v, None)
        if everything:
            for c in node.children:
                self.revoke(c, True)

    def in_subtree(self, root, node):
        while node is not None:
            if node is root:
                return True
            node = node.parent
        return False

    def describe(self, node):
        iso = lambda ts: fmt_time(ts - self.offset, "rfc3339") if ts else ""  # noqa: E731
        return {
            "id": node.id,
            "ttl": max(1, int(round(node.ttl_s / self.minute))),
            "expired_date": iso(node.expires),
            "last_rotate": iso(node.last_rotate),
            "depth": node.depth,
            "deny_rotate": node.deny_rotate,
            "deny_inheritance": node.deny_inheritance,
            "revoked": node.revoked,
            "comment": node.description,
            "children": {c.id: self.describe(c) for c in node.children},
        }

    def take(self, faults, key, value):
        for f in faults:
            if f["count"] != 0 and f[key] == value:
                f["count"] -= 1 if f["count"] > 0 else 0
                return f
        return None


def uid_bool(body, field):
    v = body.get(field)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, "%s must be a boolean" % field)
    return v


def uid_auth(api, body):
    """/auth with access-type universal_identity: only the `uid-token` spelling."""
    node = api.s.uid.find(body.get("uid-token"))
    if node is None:
        raise ApiError(401, "failed to authenticate", "universal identity token is invalid, expired or rotated")
    return api.s.uid.methods[node.method]["access_id"], node


def uid_rotate_token(api, body):
    tree = api.s.uid
    old = body.get("uid-token")
    ack = body.get("send-manual-ack-token") if tree.manual_ack else None
    if ack:
        node = tree.values.get(ack)
        if node is not None and node.alive(tree) and node.token == ack and old in node.retired:
            return {"token": ack}  # already acknowledged: an ack is safe to repeat
        if node is None or not node.alive(tree) or node.pending != ack or node.token != old:
            raise ApiError(400, "failed to ack token", "no rotation of this token waits for that ack")
        tree.values.pop(node.token, None)
        node.retired.add(node.token)
        node.token, node.pending = ack, None
        return {"token": ack}
    node = tree.find(old)
    if node is None:
        raise ApiError(401, "failed to rotate token", "universal identity token is invalid, expired or rotated")
    if old != node.token:
        raise ApiError(400, "failed to rotate token", "this token waits for its rotation to be acknowledged")
    if uid_bool(body, "fork"):  # a new child with default parameters; the caller keeps its token
        return {"token": UidNode(tree, node.method, node, node.ttl_s).token}
    if node.deny_rotate:
        raise ApiError(403, "failed to rotate token", "this token is not allowed to rotate")
    if node.pending is not None:  # a second rotation before the ack replaces the first
        tree.values.pop(node.pending, None)
        node.pending = None
    new = tree.new_value(node)
    if uid_bool(body, "with-manual-ack") and tree.manual_ack:
        node.pending = new
    else:
        tree.values.pop(node.token, None)
        node.retired.add(node.token)
        node.token = new
    node.expires = tree.clock() + node.ttl_s
    node.last_rotate = tree.clock()
    return {"token": new}


def uid_generate_token(api, body):
    info = api.require_token(body)
    if info.get("access_type") == "universal_identity":
        raise ApiError(403, "failed to generate token", "a universal identity token cannot generate root tokens")
    name = body.get("auth-method-name")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "auth-method-name is required")
    return {"token": api.s.uid.generate(name).token}


def uid_create_child_token(api, body):
    tree = api.s.uid
    if body.get("uid-token") or not body.get("uid-token-id"):
        parent = tree.caller(body, api, "create child token")
    else:  # an administrator names the parent by auth method and token id
        api.require_token(body)
        parent = next((n for n in set(tree.values.values()) if n.id == body.get("uid-token-id")
                       and n.method == body.get("auth-method-name")), None)
        if parent is None:
            raise ApiError(404, "failed to create child token", "uid-token-id not found in auth-method-name")
    if parent.deny_inheritance:
        raise ApiError(403, "failed to create child token", "this token is not allowed to create children")
    ttl = body.get("child-ttl")
    if ttl is None:
        ttl_s = parent.ttl_s
    elif isinstance(ttl, int) and not isinstance(ttl, bool) and ttl > 0:
        ttl_s = ttl * tree.minute
    else:
        raise ApiError(400, "child-ttl must be a positive number of minutes")
    child = UidNode(tree, parent.method, parent, ttl_s, uid_bool(body, "child-deny-rotate"),
                    uid_bool(body, "child-deny-inheritance"), body.get("description") or body.get("comment") or "")
    return {"token": child.token}


def uid_list_children(api, body):
    tree = api.s.uid
    node = tree.caller(body, api, "list children")
    count = []

    def walk(n):
        count.append(n)
        depth = n.depth
        for c in n.children:
            depth = max(depth, walk(c))
        return depth

    max_depth = walk(node)
    return {"max_depth": max_depth, "number_of_tokens": len(count), "root": tree.describe(node)}


def uid_revoke_token(api, body):
    tree = api.s.uid
    caller = tree.caller(body, api, "revoke token")
    target_id = body.get("revoke-token")
    kind = body.get("revoke-type")
    if kind not in ("revokeSelf", "revokeAll"):
        raise ApiError(400, "revoke-type must be revokeSelf or revokeAll")
    stack, target = [caller], None
    while stack:
        n = stack.pop()
        if target_id in (n.id, n.token, n.pending):
            target = n
            break
        stack.extend(n.children)
    if target is None:
        raise ApiError(404, "failed to revoke token", "no token %s under the caller" % target_id)
    tree.revoke(target, kind == "revokeAll")
    return {}


UID_COMMANDS = {
    "uid-rotate-token": uid_rotate_token,
    "uid-generate-token": uid_generate_token,
    "uid-create-child-token": uid_create_child_token,
    "uid-list-children": uid_list_children,
    "uid-revoke-token": uid_revoke_token,
}


def uid_control(api, action, body):
    """Control actions of the UID tree; None when `action` is not one of them."""
    tree = api.s.uid
    if action == "uid-method":  # an auth method and its root token
        m = tree.add_method(body["name"], int(body.get("ttl", 60)))
        return {"access_id": m["access_id"], "token": tree.generate(body["name"]).token}
    if action == "uid-token":  # a root token of a fresh method; ttl in seconds
        name = "/fake/uid-%d" % (len(tree.methods) + 1)
        tree.add_method(name, 60)
        return {"token": tree.generate(name, float(body.get("ttl", 3600))).token}
    if action == "uid-expire":
        for n in set(tree.values.values()):
            n.expires = 0
        return {}
    if action == "uid-tokens":
        return {"valid": sum(1 for v in tree.values if tree.find(v) is not None)}
    if action == "uid-clock":
        tree.offset += float(body.get("advance", 0))
        return {"offset": tree.offset}
    if action == "uid-valid":  # is this value usable (auth would accept it)?
        return {"valid": tree.find(body.get("token")) is not None}
    if action == "drop":
        tree.drops.append({"command": body["command"], "count": int(body.get("count", 1))})
        return {}
    if action == "uid-manual-ack":
        tree.manual_ack = bool(body.get("supported", True))
        return {}
    if action == "uid-clear-faults":
        tree.drops.clear()
        tree.stalls.clear()
        return {}
    if action == "stall":
        tree.stalls.append({"phase": body["phase"], "seconds": float(body.get("seconds", 30)),
                            "count": int(body.get("count", 1))})
        return {}
    return None


def make_handler(api, verbose):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):  # quiet unless asked: request lines carry no secrets anyway
            if verbose:
                sys.stderr.write("fake-akeyless: " + (fmt % a) + "\n")

        def send(self, status, payload, content_type="application/json"):
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a timeout test); nothing to report

        def read_body(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            if not raw:
                return {}
            try:
                body = json.loads(raw)
            except ValueError:
                raise ApiError(400, "invalid JSON body")
            if not isinstance(body, dict):
                raise ApiError(400, "body must be a JSON object")
            return body

        def do_GET(self):
            self.dispatch()

        def do_POST(self):
            self.dispatch()

        def dispatch(self):
            path = self.path.split("?", 1)[0].rstrip("/")
            try:
                body = self.read_body()
                if "/__control/" in path:
                    with api.s.lock:
                        out = api.control(path.rsplit("/", 1)[1], body)
                    return self.send(200, out)
                command = path.rsplit("/", 1)[-1]
                if self.command != "POST" or (command not in Api.COMMANDS and command not in UID_COMMANDS):
                    # Go's default mux answer, not Akeyless's error shape.
                    raise ApiError(404, "", raw=b"404 page not found\n", content_type="text/plain; charset=utf-8")
                self.inject(command)
                stall = self.uid_stall(command, body)
                if stall and stall["phase"] == "ack":  # the ack does not land while stalled
                    time.sleep(stall["seconds"])
                with api.s.lock:
                    api.s.calls[command] = api.s.calls.get(command, 0) + 1
                    kind = "client-type:%s" % self.headers.get("akeylessclienttype", "")
                    api.s.calls[kind] = api.s.calls.get(kind, 0) + 1
                    if command in UID_COMMANDS:
                        out = UID_COMMANDS[command](api, body)
                    else:
                        out = getattr(api, Api.COMMANDS[command])(body)
                    drop = api.s.uid.take(api.s.uid.drops, "command", command)
                    if drop:
                        api.s.calls["dropped:" + command] = api.s.calls.get("dropped:" + command, 0) + 1
                if stall and stall["phase"] == "rotate":  # applied, answer held back
                    time.sleep(stall["seconds"])
                if drop:  # applied, but the answer is lost on the way
                    self.close_connection = True
                    return
                self.send(200, out)
            except ApiError as e:
                if e.raw is not None:
                    return self.send(e.status, e.raw, e.content_type)
                self.send(e.status, {"error": e.error})

        def uid_stall(self, command, body):
            if command != "uid-rotate-token":
                return None
            phase = "ack" if body.get("send-manual-ack-token") else "rotate"
            with api.s.lock:
                f = api.s.uid.take(api.s.uid.stalls, "phase", phase)
                if f:
                    api.s.calls["stalled:" + phase] = api.s.calls.get("stalled:" + phase, 0) + 1
            return f

        def inject(self, command):
            delay = 0.0
            fail = None
            with api.s.lock:
                for lat in api.s.latencies:
                    if lat["count"] != 0 and lat["command"] in ("*", command):
                        delay = lat["seconds"]
                        lat["count"] -= 1 if lat["count"] > 0 else 0
                        break
                for f in api.s.failures:
                    if f["count"] != 0 and f["command"] in ("*", command):
                        f["count"] -= 1 if f["count"] > 0 else 0
                        fail = f
                        break
                api.s.calls["injected:" + command] = api.s.calls.get("injected:" + command, 0) + (
                    1 if fail or delay else 0)
            if delay:
                time.sleep(delay)
            if fail:
                body = fail["body"]
                if body is None:
                    raise ApiError(fail["status"], "injected failure (status %d)" % fail["status"])
                if isinstance(body, str):
                    raise ApiError(fail["status"], "", raw=body.encode(), content_type=fail["content_type"])
                raise ApiError(fail["status"], "", raw=json.dumps(body).encode())

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A refused TLS handshake (wrong CA, no client cert, plain http) is a test's point, not news.
        if isinstance(sys.exc_info()[1], (ssl.SSLError, ConnectionError)):
            return
        super().handle_error(request, client_address)


def make_certs(directory):
    """A throw-away CA, a server certificate for 127.0.0.1/::1/localhost and a client certificate."""
    os.makedirs(directory, exist_ok=True)
    start = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=2)

    def write(name, data, mode=0o644):
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kms-plugin test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    key_pem = lambda k: k.private_bytes(  # noqa: E731
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write("ca.pem", pem(ca))
    for name, usage, sans in [
        ("server", x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
         [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
          x509.IPAddress(ipaddress.ip_address("::1"))]),
        ("client", x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("kms-plugin-test-client")]),
        ("client-rsa", x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH, [x509.DNSName("kms-plugin-test-client")]),
    ]:
        if name.endswith("-rsa"):
            from cryptography.hazmat.primitives.asymmetric import rsa
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kms-plugin test " + name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        write(name + ".pem", pem(cert))
        write(name + "-key.pem", key_pem(key), 0o600)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "::1", "localhost"])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--port-file")
    p.add_argument("--access-id")
    p.add_argument("--access-key", default=os.environ.get("FAKE_AKEYLESS_ACCESS_KEY"))
    p.add_argument("--key", action="append", help="create an AES256GCM key with this name")
    p.add_argument("--token-ttl", type=float, default=3600.0)
    p.add_argument("--expiration-format", default="rfc3339", choices=["rfc3339", "go", "unix", "none"])
    p.add_argument("--uid-token-file", help="create a UID token and write it here (mode 0600)")
    p.add_argument("--uid-minute-seconds", type=float, default=60.0,
                   help="length of one UID TTL minute in seconds (tests: 1)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when the parent closes stdin (or dies)")
    p.add_argument("--gateway", action="store_true", help="behave as a customer Gateway (k8s auth allowed)")
    p.add_argument("--no-cert-challenge", action="store_true", help="an older server without /get-cert-challenge")
    p.add_argument("--k8s-auth-config", action="append", help="a k8s auth config name the gateway knows")
    p.add_argument("--aws-access-key-id", help="AWS key whose SigV4 signatures aws_iam logins must carry")
    p.add_argument("--aws-secret-access-key", default=os.environ.get("FAKE_AKEYLESS_AWS_SECRET"))
    p.add_argument("--tls-dir", help="serve HTTPS with DIR/server.pem (made with --make-certs if missing)")
    p.add_argument("--require-client-cert", action="store_true", help="mutual TLS: client cert from DIR/ca.pem")
    p.add_argument("--make-certs", metavar="DIR", help="write a test CA, server and client pairs to DIR and exit")
    args = p.parse_args()
    if args.make_certs:
        make_certs(args.make_certs)
        return

    state = State(args)
    api = Api(state)
    if args.uid_token_file:
        tok = uid_control(api, "uid-token", {})["token"]
        fd = os.open(args.uid_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(tok)
    server = Server((args.host, args.port), make_handler(api, args.verbose))
    if args.tls_dir:
        if not os.path.exists(os.path.join(args.tls_dir, "server.pem")):
            make_certs(args.tls_dir)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(os.path.join(args.tls_dir, "server.pem"), os.path.join(args.tls_dir, "server-key.pem"))
        if args.require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(os.path.join(args.tls_dir, "ca.pem"))
        # Handshake in the handler thread, so one stuck client cannot block the accept loop.
        server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    port = server.server_address[1]
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.rename(tmp, args.port_file)
    print("PORT %d" % port, flush=True)
    if args.exit_on_stdin_eof:
        def watch():
            sys.stdin.read()
            os._exit(0)
        threading.Thread(target=watch, daemon=True).start()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
