#!/usr/bin/env python3
"""A stand-in for Google Cloud KMS (and the Google token endpoints) for tests. Loopback only.

Wire protocols, as the official clients use them:
  HTTP/JSON  the Rust SDK (google-cloud-kms-v1) and the Python REST transport: `/v1/{resource}`
             paths, camelCase JSON, bytes as base64, errors as a google.rpc.Status
             `{"error": {"code", "message", "status", "details"}}`; `$alt=json;enum-encoding=int`
             makes enums integers in answers.
  gRPC       (--grpc-port, needs google-cloud-kms + grpcio) the Python gRPC transport, over TLS with
             the CA in DIR/ca.pem; errors carry grpc-status-details-bin.

Strict like the service: unknown JSON fields are INVALID_ARGUMENT, malformed resource names are
INVALID_ARGUMENT, missing ones NOT_FOUND, and every KMS call needs `authorization: Bearer <token>`:
  - a self-signed JWT (RS256) of the service account in DIR/sa.json: iss = sub = client_email,
    kid = private_key_id, aud https://cloudkms.googleapis.com/ or a cloud-platform scope, at most
    one hour, not expired;
  - or an access token this server issued: POST /token (OAuth2 JWT-bearer grant with an assertion
    of that service account, aud = its token_uri), POST /v1/token (STS token exchange for the
    workload identity pool in DIR/external.json with the subject token in DIR/subject-token),
    GET /computeMetadata/v1/instance/service-accounts/default/token (Metadata-Flavor: Google).
  A missing token is UNAUTHENTICATED/CREDENTIALS_MISSING, an expired or unknown one
  UNAUTHENTICATED/ACCESS_TOKEN_EXPIRED, as Google answers.

On start it writes DIR/sa.json, DIR/external.json, DIR/subject-token and, for gRPC or --tls
(HTTPS), DIR/ca.pem, then prints `PORT n` (and `GRPC_PORT m`).

Cryptography is real: AES-256-GCM per CryptoKeyVersion, the version travels inside the ciphertext,
the additional authenticated data is bound. A DISABLED / DESTROYED version refuses with
FAILED_PRECONDITION naming its state, like Cloud KMS.

Control API for tests (JSON):
  GET  /__control/stats                calls per method, tokens issued per grant, auth refusals
  POST /__control/key   {"name": KEY, "action": "create"|"rotate"|"disable"|"enable"|"destroy"|
                         "primary"|"deny"|"allow", "version": N, "purpose": "ENCRYPT_DECRYPT"}
  POST /__control/fail  {"method": "encrypt"|"decrypt"|"get"|"*", "status": 403, "count": 1,
                         "body": "<html>..", "content_type": "text/html"}  (a proxy's answer;
                         count -1 = until cleared; without body: empty)
  POST /__control/latency {"method": "decrypt"|"*", "seconds": 10, "count": 1}  hold answers
                         (count -1 = until cleared)
  POST /__control/clear-faults
  POST /__control/token-ttl {"seconds": 3}   lifetime of tokens issued from now on
  POST /__control/corrupt {"method": "encrypt"|"decrypt", "count": 1}  flip a bit of the returned
                         ciphertext / plaintext but keep its checksum (damage in transit)

Integrity fields as Cloud KMS has them: a *_crc32c given in a request is checked (INVALID_ARGUMENT
on a mismatch) and reported in verified_*_crc32c; responses carry ciphertext_crc32c / plaintext_crc32c.
"""

import argparse
import base64
import datetime
import json
import os
import re
import secrets
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit, unquote

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ID = r"[a-zA-Z0-9_-]{1,63}"
PROJECT = r"[a-z][a-z0-9-]{4,28}[a-z0-9]"
LOCATION = r"[a-z0-9-]{1,63}"
KEYRING_RE = re.compile(rf"^projects/({PROJECT})/locations/({LOCATION})/keyRings/({ID})$")
KEY_RE = re.compile(rf"^(projects/{PROJECT}/locations/{LOCATION}/keyRings/{ID})/cryptoKeys/({ID})$")
VERSION_RE = re.compile(rf"^(projects/{PROJECT}/locations/{LOCATION}/keyRings/{ID}/cryptoKeys/{ID})/cryptoKeyVersions/([0-9]+)$")
LOCATION_RE = re.compile(rf"^projects/({PROJECT})/locations/({LOCATION})$")

KMS_AUDIENCE = "https://cloudkms.googleapis.com/"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform", "https://www.googleapis.com/auth/cloudkms")
STATES = ["CRYPTO_KEY_VERSION_STATE_UNSPECIFIED", "ENABLED", "DISABLED", "DESTROYED",
          "DESTROY_SCHEDULED", "PENDING_GENERATION", "PENDING_IMPORT", "IMPORT_FAILED",
          "GENERATION_FAILED", "PENDING_EXTERNAL_DESTRUCTION", "EXTERNAL_DESTRUCTION_FAILED"]
STATE_NUM = {"CRYPTO_KEY_VERSION_STATE_UNSPECIFIED": 0, "PENDING_GENERATION": 5, "ENABLED": 1,
             "DISABLED": 2, "DESTROYED": 3, "DESTROY_SCHEDULED": 4}
PURPOSE_NUM = {"CRYPTO_KEY_PURPOSE_UNSPECIFIED": 0, "ENCRYPT_DECRYPT": 1, "ASYMMETRIC_SIGN": 5,
               "ASYMMETRIC_DECRYPT": 6, "RAW_ENCRYPT_DECRYPT": 7, "MAC": 9}
HTTP_OF = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401,
           "PERMISSION_DENIED": 403, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
           "RESOURCE_EXHAUSTED": 429, "INTERNAL": 500, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503}
MAGIC = b"GKF1"


class ApiError(Exception):
    def __init__(self, status, message, reason=None, domain="googleapis.com", raw=None,
                 http=None, content_type="application/json"):
        super().__init__(message)
        self.status, self.message, self.reason, self.domain = status, message, reason, domain
        self.raw, self.content_type = raw, content_type
        self.http = http or HTTP_OF.get(status, 500)

    def body(self):
        if self.raw is not None:
            return self.raw
        err = {"code": self.http, "message": self.message, "status": self.status}
        if self.reason:
            err["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                               "reason": self.reason, "domain": self.domain}]
        return json.dumps({"error": err}).encode()


def now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def b64url_decode(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def b64_field(body, field, required=True, limit=65536):
    v = body.get(field)
    if v is None or v == "":
        if required:
            raise ApiError("INVALID_ARGUMENT", f"{field} is required.")
        return b""
    if not isinstance(v, str):
        raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{field}': expected base64 bytes.")
    try:
        out = base64.b64decode(v.replace("-", "+").replace("_", "/") + "=" * (-len(v) % 4), validate=True)
    except Exception:
        raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{field}' (TYPE_BYTES), Base64 decoding failed.")
    if len(out) > limit:
        raise ApiError("INVALID_ARGUMENT", f"The {field} exceeds the maximum size.")
    return out


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


CRC32C_TABLE = _crc32c_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = CRC32C_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def check_crc(body, field, data, data_field):
    """Checks an optional Int64Value checksum (a JSON string, or a number); True when one was given."""
    v = body.get(field)
    if v is None:
        return False
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ApiError("INVALID_ARGUMENT", f"Invalid value at '{field}' (TYPE_INT64), \"{v}\"")
    if n != crc32c(data):
        snake = re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), field)
        raise ApiError("INVALID_ARGUMENT",
                       f"The checksum in field {snake} did not match the data in field {data_field}.")
    return True


def check_fields(body, allowed):
    if not isinstance(body, dict):
        raise ApiError("INVALID_ARGUMENT", "Invalid JSON payload received. Expected an object.")
    for k in body:
        if k not in allowed:
            raise ApiError("INVALID_ARGUMENT",
                           f'Invalid JSON payload received. Unknown name "{k}": Cannot find field.')


class Version:
    def __init__(self, key, num):
        self.key, self.num = key, num
        self.name = f"{key.name}/cryptoKeyVersions/{num}"
        self.state = "ENABLED"
        self.material = AESGCM.generate_key(bit_length=256)
        self.create_time = now_rfc3339()

    def to_json(self, ints):
        return {"name": self.name, "state": STATE_NUM[self.state] if ints else self.state,
                "createTime": self.create_time,
                "protectionLevel": 1 if ints else "SOFTWARE",
                "algorithm": 1 if ints else "GOOGLE_SYMMETRIC_ENCRYPTION",
                "generateTime": self.create_time}


class Key:
    def __init__(self, name, purpose="ENCRYPT_DECRYPT"):
        self.name, self.purpose = name, purpose
        self.versions, self.primary, self.denied = {}, None, False
        self.create_time = now_rfc3339()

    def new_version(self):
        v = Version(self, len(self.versions) + 1)
        self.versions[v.num] = v
        return v

    def to_json(self, ints):
        out = {"name": self.name, "purpose": PURPOSE_NUM[self.purpose] if ints else self.purpose,
               "createTime": self.create_time,
               "versionTemplate": {"protectionLevel": 1 if ints else "SOFTWARE",
                                   "algorithm": 1 if ints else "GOOGLE_SYMMETRIC_ENCRYPTION"}}
        if self.purpose == "ENCRYPT_DECRYPT" and self.primary is not None:
            out["primary"] = self.versions[self.primary].to_json(ints)
        return out


class State:
    def __init__(self, args):
        self.lock = threading.RLock()
        self.key_rings, self.keys = {}, {}
        self.tokens = {}  # access token -> expiry (unix)
        self.token_ttl = 3600
        self.faults, self.latency = [], []
        self.corrupt = {}  # method -> answers still to damage
        self.stats = {"calls": {}, "issued": {}, "refused": {}, "jwt_logins": 0}
        self.sa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.sa_email = "kms-plugin@kms-plugin-test.iam.gserviceaccount.com"
        self.sa_key_id = secrets.token_hex(20)
        self.subject_token = "subject-" + secrets.token_urlsafe(24)
        self.wif_audience = ("//iam.googleapis.com/projects/123456789/locations/global/"
                             "workloadIdentityPools/kms-plugin/providers/on-prem")
        for k in args.key or []:
            self.create_key(k)

    def count(self, group, name):
        with self.lock:
            self.stats[group][name] = self.stats[group].get(name, 0) + 1

    def create_key(self, name, purpose="ENCRYPT_DECRYPT"):
        m = KEY_RE.match(name)
        if not m:
            raise ApiError("INVALID_ARGUMENT", f"Invalid resource name {name}.")
        with self.lock:
            self.key_rings.setdefault(m.group(1), now_rfc3339())
            if name in self.keys:
                raise ApiError("ALREADY_EXISTS", f"CryptoKey {name} already exists.")
            k = Key(name, purpose)
            self.keys[name] = k
            if purpose == "ENCRYPT_DECRYPT":
                k.primary = k.new_version().num
            return k

    def issue(self, grant):
        tok = "ya29.fake-" + secrets.token_urlsafe(32)
        with self.lock:
            self.tokens[tok] = time.time() + self.token_ttl
            self.stats["issued"][grant] = self.stats["issued"].get(grant, 0) + 1
        return {"access_token": tok, "expires_in": self.token_ttl, "token_type": "Bearer"}

    def public_key(self):
        return self.sa_private.public_key()

    def verify_jwt(self, token, audiences, need_scope_or_aud=True):
        parts = token.split(".")
        if len(parts) != 3:
            return None
        try:
            header = json.loads(b64url_decode(parts[0]))
            claims = json.loads(b64url_decode(parts[1]))
            sig = b64url_decode(parts[2])
        except Exception:
            return None
        if header.get("alg") != "RS256" or header.get("kid") not in (None, self.sa_key_id):
            return None
        try:
            self.public_key().verify(sig, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except Exception:
            return None
        t = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, (int, float)) or not isinstance(exp, (int, float)):
            return None
        if claims.get("iss") != self.sa_email or exp <= t or iat > t + 60 or exp - iat > 3700:
            return None
        if claims.get("sub") not in (None, self.sa_email):
            return None
        aud_ok = claims.get("aud") in audiences
        scope_ok = any(s in str(claims.get("scope", "")).split() for s in SCOPES)
        if need_scope_or_aud and not (aud_ok or scope_ok):
            return None
        return claims

    def authorize(self, header):
        if not header:
            self.count("refused", "missing")
            raise ApiError("UNAUTHENTICATED",
                           "Request is missing required authentication credential. Expected OAuth 2 "
                           "access token, login cookie or other valid authentication credential.",
                           reason="CREDENTIALS_MISSING")
        scheme, _, tok = header.partition(" ")
        if scheme.lower() != "bearer" or not tok:
            self.count("refused", "scheme")
            raise ApiError("UNAUTHENTICATED", "Request had invalid authentication credentials.",
                           reason="ACCESS_TOKEN_TYPE_UNSUPPORTED")
        with self.lock:
            exp = self.tokens.get(tok)
        if exp is not None and exp > time.time():
            return
        if exp is None and self.verify_jwt(tok, (KMS_AUDIENCE, KMS_AUDIENCE.rstrip("/"))):
            with self.lock:
                self.stats["jwt_logins"] += 1
            return
        self.count("refused", "expired" if exp is not None else "invalid")
        raise ApiError("UNAUTHENTICATED",
                       "Request had invalid authentication credentials. Expected OAuth 2 access "
                       "token, login cookie or other valid authentication credential.",
                       reason="ACCESS_TOKEN_EXPIRED")

    def delay(self, method):
        with self.lock:
            for f in self.latency:
                if f["method"] in ("*", method) and f["count"] != 0:
                    if f["count"] > 0:
                        f["count"] -= 1
                    return f["seconds"]
        return 0

    def take_fault(self, method):
        with self.lock:
            for f in self.faults:
                if f["method"] in ("*", method) and f["count"] != 0:
                    if f["count"] > 0:
                        f["count"] -= 1
                    body = f.get("body")
                    raw = body.encode() if isinstance(body, str) else (
                        json.dumps(body).encode() if body is not None else b"")
                    return ApiError("INJECTED", "injected", raw=raw, http=f["status"],
                                    content_type=f.get("content_type", "text/html"))
        return None

    # ---- KMS methods, on JSON-shaped dicts (camelCase) ----

    def key(self, name, for_use=True):
        if not KEY_RE.match(name or ""):
            raise ApiError("INVALID_ARGUMENT", f"Resource name [{name}] does not match any known pattern.")
        k = self.keys.get(name)
        if k is None:
            raise ApiError("NOT_FOUND", f"CryptoKey {name} not found.")
        if k.denied:
            perm = "cloudkms.cryptoKeyVersions.useToEncrypt" if for_use else "cloudkms.cryptoKeys.get"
            raise ApiError("PERMISSION_DENIED",
                           f"Permission '{perm}' denied on resource '{name}' (or it may not exist).",
                           reason="IAM_PERMISSION_DENIED", domain="cloudkms.googleapis.com")
        return k

    @staticmethod
    def unusable(v):
        if v.state != "ENABLED":
            raise ApiError("FAILED_PRECONDITION",
                           f"The request cannot be fulfilled. Resource {v.name} has value {v.state} "
                           f"in field crypto_key_version.state.")

    def encrypt(self, name, body):
        check_fields(body, {"plaintext", "additionalAuthenticatedData", "plaintextCrc32c",
                            "additionalAuthenticatedDataCrc32c"})
        m = VERSION_RE.match(name or "")
        with self.lock:
            k = self.key(m.group(1) if m else name)
            if k.purpose != "ENCRYPT_DECRYPT":
                raise ApiError("FAILED_PRECONDITION", f"{k.name} is not a symmetric ENCRYPT_DECRYPT key.")
            v = k.versions.get(int(m.group(2))) if m else k.versions.get(k.primary)
            if v is None:
                raise ApiError("NOT_FOUND", f"CryptoKeyVersion {name} not found.")
            self.unusable(v)
            pt = b64_field(body, "plaintext")
            aad = b64_field(body, "additionalAuthenticatedData", required=False)
            pt_ok = check_crc(body, "plaintextCrc32c", pt, "plaintext")
            aad_ok = check_crc(body, "additionalAuthenticatedDataCrc32c", aad, "additional_authenticated_data")
            nonce = os.urandom(12)
            ct = MAGIC + v.num.to_bytes(4, "big") + nonce + AESGCM(v.material).encrypt(nonce, pt, aad)
            crc = crc32c(ct)
            if self.take_corruption("encrypt"):
                ct = bytes([ct[0] ^ 1]) + ct[1:]
            return {"name": v.name, "ciphertext": base64.b64encode(ct).decode(), "ciphertextCrc32c": str(crc),
                    "verifiedPlaintextCrc32c": pt_ok, "verifiedAdditionalAuthenticatedDataCrc32c": aad_ok,
                    "protectionLevel": "SOFTWARE"}

    def decrypt(self, name, body):
        check_fields(body, {"ciphertext", "additionalAuthenticatedData", "ciphertextCrc32c",
                            "additionalAuthenticatedDataCrc32c"})
        with self.lock:
            k = self.key(name)
            ct = b64_field(body, "ciphertext")
            aad = b64_field(body, "additionalAuthenticatedData", required=False)
            check_crc(body, "ciphertextCrc32c", ct, "ciphertext")
            check_crc(body, "additionalAuthenticatedDataCrc32c", aad, "additional_authenticated_data")
            if len(ct) < 8 + 12 + 16 or not ct.startswith(MAGIC):
                raise ApiError("INVALID_ARGUMENT", "Decryption failed: the ciphertext is invalid.")
            v = k.versions.get(int.from_bytes(ct[4:8], "big"))
            if v is None:
                raise ApiError("INVALID_ARGUMENT", "Decryption failed: the ciphertext is invalid.")
            self.unusable(v)
            try:
                pt = AESGCM(v.material).decrypt(ct[8:20], ct[20:], aad)
            except Exception:
                raise ApiError("INVALID_ARGUMENT",
                               "Decryption failed: verify that 'name' refers to the correct CryptoKey.")
            crc = crc32c(pt)
            if self.take_corruption("decrypt"):
                pt = bytes([pt[0] ^ 1]) + pt[1:]
            return {"plaintext": base64.b64encode(pt).decode(), "plaintextCrc32c": str(crc),
                    "usedPrimary": v.num == k.primary, "protectionLevel": "SOFTWARE"}

    def get_key(self, name, ints):
        with self.lock:
            return self.key(name, for_use=False).to_json(ints)

    def get_version(self, name, ints):
        m = VERSION_RE.match(name or "")
        if not m:
            raise ApiError("INVALID_ARGUMENT", f"Resource name [{name}] does not match any known pattern.")
        with self.lock:
            k = self.key(m.group(1), for_use=False)
            v = k.versions.get(int(m.group(2)))
            if v is None:
                raise ApiError("NOT_FOUND", f"CryptoKeyVersion {name} not found.")
            return v.to_json(ints)

    def create_key_ring(self, parent, key_ring_id, body, ints):
        check_fields(body, {"name", "createTime"})
        if not LOCATION_RE.match(parent or "") or not re.fullmatch(ID, key_ring_id or ""):
            raise ApiError("INVALID_ARGUMENT", "Invalid key ring parent or keyRingId.")
        name = f"{parent}/keyRings/{key_ring_id}"
        with self.lock:
            if name in self.key_rings:
                raise ApiError("ALREADY_EXISTS", f"KeyRing {name} already exists.")
            self.key_rings[name] = now_rfc3339()
            return {"name": name, "createTime": self.key_rings[name]}

    def create_crypto_key(self, parent, key_id, body, ints):
        check_fields(body, {"purpose", "versionTemplate", "labels", "rotationPeriod",
                            "nextRotationTime", "name"})
        if not KEYRING_RE.match(parent or "") or not re.fullmatch(ID, key_id or ""):
            raise ApiError("INVALID_ARGUMENT", "Invalid CryptoKey parent or cryptoKeyId.")
        purpose = body.get("purpose", "CRYPTO_KEY_PURPOSE_UNSPECIFIED")
        if isinstance(purpose, int):
            purpose = {v: k for k, v in PURPOSE_NUM.items()}.get(purpose, "?")
        if purpose not in PURPOSE_NUM or purpose == "CRYPTO_KEY_PURPOSE_UNSPECIFIED":
            raise ApiError("INVALID_ARGUMENT", "The CryptoKey purpose must be specified.")
        with self.lock:
            if parent not in self.key_rings:
                raise ApiError("NOT_FOUND", f"KeyRing {parent} not found.")
            return self.create_key(f"{parent}/cryptoKeys/{key_id}", purpose).to_json(ints)

    def create_version(self, parent, body, ints):
        check_fields(body, {"state", "name"})
        with self.lock:
            k = self.key(parent, for_use=False)
            return k.new_version().to_json(ints)

    def update_primary(self, name, body, ints):
        check_fields(body, {"cryptoKeyVersionId"})
        with self.lock:
            k = self.key(name, for_use=False)
            vid = str(body.get("cryptoKeyVersionId", ""))
            if not vid.isdigit() or int(vid) not in k.versions:
                raise ApiError("NOT_FOUND", f"CryptoKeyVersion {name}/cryptoKeyVersions/{vid} not found.")
            v = k.versions[int(vid)]
            self.unusable(v)
            k.primary = v.num
            return k.to_json(ints)

    def update_version(self, name, mask, body, ints):
        check_fields(body, {"state", "name"})
        if mask != "state":
            raise ApiError("INVALID_ARGUMENT", "update_mask must be \"state\".")
        state = body.get("state")
        if isinstance(state, int):
            state = {v: k for k, v in STATE_NUM.items()}.get(state)
        if state not in ("ENABLED", "DISABLED"):
            raise ApiError("INVALID_ARGUMENT", "state may only be ENABLED or DISABLED.")
        m = VERSION_RE.match(name or "")
        if not m:
            raise ApiError("INVALID_ARGUMENT", f"Resource name [{name}] does not match any known pattern.")
        with self.lock:
            k = self.key(m.group(1), for_use=False)
            v = k.versions.get(int(m.group(2)))
            if v is None:
                raise ApiError("NOT_FOUND", f"CryptoKeyVersion {name} not found.")
            if v.state not in ("ENABLED", "DISABLED"):
                raise ApiError("FAILED_PRECONDITION", f"{name} is {v.state}.")
            v.state = state
            return v.to_json(ints)

    def destroy(self, name, body, ints):
        check_fields(body, set())
        m = VERSION_RE.match(name or "")
        if not m:
            raise ApiError("INVALID_ARGUMENT", f"Resource name [{name}] does not match any known pattern.")
        with self.lock:
            k = self.key(m.group(1), for_use=False)
            v = k.versions.get(int(m.group(2)))
            if v is None:
                raise ApiError("NOT_FOUND", f"CryptoKeyVersion {name} not found.")
            v.state = "DESTROY_SCHEDULED"
            return v.to_json(ints)

    def take_corruption(self, method):
        n = self.corrupt.get(method, 0)
        if n:
            self.corrupt[method] = n - 1
        return n != 0

    def control(self, action, body):
        if action == "stats":
            with self.lock:
                return json.loads(json.dumps(self.stats))
        if action == "clear-faults":
            with self.lock:
                self.faults.clear()
                self.latency.clear()
                self.corrupt.clear()
            return {}
        if action == "latency":
            with self.lock:
                self.latency.append({"method": body.get("method", "*"), "seconds": float(body["seconds"]),
                                     "count": int(body.get("count", 1))})
            return {}
        if action == "fail":
            with self.lock:
                self.faults.append({"method": body.get("method", "*"), "status": int(body.get("status", 503)),
                                    "count": int(body.get("count", 1)), "body": body.get("body"),
                                    "content_type": body.get("content_type", "text/html")})
            return {}
        if action == "corrupt":
            with self.lock:
                self.corrupt[body["method"]] = int(body.get("count", 1))
            return {}
        if action == "token-ttl":
            with self.lock:
                self.token_ttl = int(body["seconds"])
            return {}
        if action == "key":
            name, act = body["name"], body["action"]
            with self.lock:
                if act == "create":
                    return self.create_key(name, body.get("purpose", "ENCRYPT_DECRYPT")).to_json(False)
                k = self.keys[name]
                if act == "rotate":
                    v = k.new_version()
                    k.primary = v.num
                    return v.to_json(False)
                if act in ("deny", "allow"):
                    k.denied = act == "deny"
                    return {}
                v = k.versions[int(body.get("version", k.primary))]
                if act == "primary":
                    k.primary = v.num
                else:
                    v.state = {"disable": "DISABLED", "enable": "ENABLED", "destroy": "DESTROYED"}[act]
                return v.to_json(False)
        raise ApiError("NOT_FOUND", f"unknown control action {action}")


def token_endpoints(state, path, form, headers):
    """The OAuth2 token_uri, STS and the metadata server; None if `path` is none of them."""
    if path == "/token":
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            raise ApiError("INVALID_ARGUMENT", "unsupported_grant_type", raw=b'{"error":"unsupported_grant_type"}', http=400)
        if not state.verify_jwt(form.get("assertion", ""), (state.token_uri,), need_scope_or_aud=False):
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        return 200, state.issue("jwt_bearer")
    if path == "/v1/token":
        want = {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt"}
        for k, v in want.items():
            if form.get(k) != v:
                return 400, {"error": "invalid_request", "error_description": f"Invalid value for {k}."}
        if form.get("audience") != state.wif_audience:
            return 400, {"error": "invalid_target", "error_description": "The target service indicated by the \"audience\" parameters is invalid."}
        if form.get("subject_token") != state.subject_token:
            return 400, {"error": "invalid_grant", "error_description": "The subject token is invalid."}
        out = state.issue("sts")
        out["issued_token_type"] = "urn:ietf:params:oauth:token-type:access_token"
        return 200, out
    if path.startswith("/computeMetadata/v1/"):
        if headers.get("Metadata-Flavor") != "Google":
            return 403, None
        if path == "/computeMetadata/v1/instance/service-accounts/default/token":
            return 200, state.issue("metadata")
        if path == "/computeMetadata/v1/universe/universe-domain":
            return 200, "googleapis.com"
        if path == "/computeMetadata/v1/instance/service-accounts/default/":
            return 200, {"aliases": ["default"], "email": state.sa_email,
                         "scopes": ["https://www.googleapis.com/auth/cloud-platform"]}
        if path == "/computeMetadata/v1/instance/service-accounts/default/email":
            return 200, state.sa_email
        if path == "/computeMetadata/v1/project/project-id":
            return 200, "kms-plugin-test"
        return 404, None
    return None


def make_handler(state, verbose):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            if verbose:
                sys.stderr.write("gcp-fake: " + (fmt % a) + "\n")

        def send(self, status, payload, content_type="application/json"):
            if isinstance(payload, (dict, list)):
                data = json.dumps(payload).encode()
            elif isinstance(payload, str):
                data, content_type = payload.encode(), "application/text"
            else:
                data = payload or b""
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            if status == 200 and self.path.startswith("/computeMetadata/"):
                self.send_header("Metadata-Flavor", "Google")
            self.end_headers()
            self.wfile.write(data)

        def read_body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def do_GET(self):
            self.dispatch("GET")

        def do_POST(self):
            self.dispatch("POST")

        def do_PATCH(self):
            self.dispatch("PATCH")

        def dispatch(self, method):
            url = urlsplit(self.path)
            path, query = unquote(url.path), parse_qs(url.query)
            raw = self.read_body()
            try:
                if path.startswith("/__control/"):
                    body = json.loads(raw or b"{}")
                    return self.send(200, state.control(path[len("/__control/"):], body))
                form = {k: v[0] for k, v in parse_qs(raw.decode(errors="replace")).items()} if method == "POST" and not raw.startswith(b"{") else {}
                tok = token_endpoints(state, path, form, self.headers)
                if tok is not None:
                    return self.send(tok[0], tok[1])
                self.send(200, self.kms(method, path, query, raw))
            except ApiError as e:
                self.send(e.http, e.body(), e.content_type)

        def kms(self, method, path, query, raw):
            if not path.startswith("/v1/"):
                raise ApiError("NOT_FOUND", "not found", raw=b"<html>404 Not Found</html>", http=404,
                               content_type="text/html")
            resource, _, verb = path[len("/v1/"):].partition(":")
            ints = "enum-encoding=int" in ";".join(query.get("$alt", []))
            op = {"encrypt": "encrypt", "decrypt": "decrypt"}.get(verb, "get" if method == "GET" else "admin")
            state.count("calls", verb or f"{method} {resource.split('/')[-2] if '/' in resource else resource}")
            hold = state.delay(op)
            if hold:
                time.sleep(hold)
            fault = state.take_fault(op)
            if fault:
                raise fault
            state.authorize(self.headers.get("Authorization"))
            try:
                body = json.loads(raw) if raw else {}
            except ValueError:
                raise ApiError("INVALID_ARGUMENT", "Invalid JSON payload received.")
            if method == "POST" and verb == "encrypt":
                return state.encrypt(resource, body)
            if method == "POST" and verb == "decrypt":
                return state.decrypt(resource, body)
            if method == "POST" and verb == "updatePrimaryVersion":
                return state.update_primary(resource, body, ints)
            if method == "POST" and verb == "destroy":
                return state.destroy(resource, body, ints)
            if method == "GET" and not verb:
                if VERSION_RE.match(resource):
                    return state.get_version(resource, ints)
                return state.get_key(resource, ints)
            if method == "POST" and resource.endswith("/keyRings") and not verb:
                return state.create_key_ring(resource[: -len("/keyRings")], query.get("keyRingId", [""])[0], body, ints)
            if method == "POST" and resource.endswith("/cryptoKeys") and not verb:
                return state.create_crypto_key(resource[: -len("/cryptoKeys")], query.get("cryptoKeyId", [""])[0], body, ints)
            if method == "POST" and resource.endswith("/cryptoKeyVersions") and not verb:
                return state.create_version(resource[: -len("/cryptoKeyVersions")], body, ints)
            if method == "PATCH" and VERSION_RE.match(resource):
                return state.update_version(resource, query.get("updateMask", [""])[0], body, ints)
            raise ApiError("NOT_FOUND", "not found", raw=b"<html>404 Not Found</html>", http=404,
                           content_type="text/html")

    return H


def write_files(state, d, port, scheme):
    os.makedirs(d, exist_ok=True)
    state.token_uri = f"{scheme}://127.0.0.1:{port}/token"
    pem = state.sa_private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode()
    sa = {"type": "service_account", "project_id": "kms-plugin-test", "private_key_id": state.sa_key_id,
          "private_key": pem, "client_email": state.sa_email, "client_id": "1234567890",
          "auth_uri": "https://accounts.google.com/o/oauth2/auth", "token_uri": state.token_uri,
          "universe_domain": "googleapis.com"}
    subject = os.path.join(d, "subject-token")
    ext = {"type": "external_account", "audience": state.wif_audience,
           "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
           "token_url": f"{scheme}://127.0.0.1:{port}/v1/token",
           "credential_source": {"file": subject}, "universe_domain": "googleapis.com"}
    for name, content in (("sa.json", json.dumps(sa)), ("external.json", json.dumps(ext)),
                          ("subject-token", state.subject_token)):
        path = os.path.join(d, name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(content)


def make_tls(d):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress
    ca_key = ec.generate_private_key(ec.SECP256R1())
    t = datetime.datetime.now(datetime.timezone.utc)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gcp-fake test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(t - datetime.timedelta(minutes=5))
          .not_valid_after(t + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(t - datetime.timedelta(minutes=5)).not_valid_after(t + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)
    kpem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with open(os.path.join(d, "ca.pem"), "wb") as f:
        f.write(pem(ca))
    return pem(cert), kpem


def serve_grpc(state, tls, port):
    """The gRPC transport: same state, same checks, proto messages from google-cloud-kms."""
    import grpc
    from concurrent import futures
    from google.cloud import kms_v1
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2

    codes = {"INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT, "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
             "UNAUTHENTICATED": grpc.StatusCode.UNAUTHENTICATED, "PERMISSION_DENIED": grpc.StatusCode.PERMISSION_DENIED,
             "NOT_FOUND": grpc.StatusCode.NOT_FOUND, "ALREADY_EXISTS": grpc.StatusCode.ALREADY_EXISTS}

    def to_json(msg):
        # Fields at their default are absent, as in a JSON request.
        return json.loads(type(msg).to_json(msg, use_integers_for_enums=False,
                                            always_print_fields_with_no_presence=False))

    def handler(fn, req_type, resp_type, name):
        def call(request, context):
            state.count("calls", "grpc:" + name)
            try:
                md = dict(context.invocation_metadata())
                state.authorize(md.get("authorization"))
                out = fn(request)
                return resp_type.from_json(json.dumps(out), ignore_unknown_fields=False)
            except ApiError as e:
                st = status_pb2.Status(code=codes.get(e.status, grpc.StatusCode.INTERNAL).value[0], message=e.message)
                if e.reason:
                    a = any_pb2.Any()
                    a.Pack(error_details_pb2.ErrorInfo(reason=e.reason, domain=e.domain))
                    st.details.append(a)
                context.abort_with_status(_RichStatus(codes.get(e.status, grpc.StatusCode.INTERNAL), e.message, st))
        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=req_type.deserialize,
                                                   response_serializer=resp_type.serialize)

    class _RichStatus(grpc.Status):
        def __init__(self, code, details, st):
            self.code, self.details = code, details
            self.trailing_metadata = (("grpc-status-details-bin", st.SerializeToString()),)

    def body(req, drop):
        d = to_json(req)
        for k in drop:
            d.pop(k, None)
        return d

    methods = {
        "Encrypt": (lambda r: state.encrypt(r.name, body(r, ["name"])), kms_v1.EncryptRequest, kms_v1.EncryptResponse),
        "Decrypt": (lambda r: state.decrypt(r.name, body(r, ["name"])), kms_v1.DecryptRequest, kms_v1.DecryptResponse),
        "GetCryptoKey": (lambda r: state.get_key(r.name, False), kms_v1.GetCryptoKeyRequest, kms_v1.CryptoKey),
        "GetCryptoKeyVersion": (lambda r: state.get_version(r.name, False), kms_v1.GetCryptoKeyVersionRequest, kms_v1.CryptoKeyVersion),
        "CreateKeyRing": (lambda r: state.create_key_ring(r.parent, r.key_ring_id, to_json(r.key_ring), False),
                          kms_v1.CreateKeyRingRequest, kms_v1.KeyRing),
        "CreateCryptoKey": (lambda r: state.create_crypto_key(r.parent, r.crypto_key_id, to_json(r.crypto_key), False),
                            kms_v1.CreateCryptoKeyRequest, kms_v1.CryptoKey),
        "CreateCryptoKeyVersion": (lambda r: state.create_version(r.parent, to_json(r.crypto_key_version), False),
                                   kms_v1.CreateCryptoKeyVersionRequest, kms_v1.CryptoKeyVersion),
        "UpdateCryptoKeyPrimaryVersion": (lambda r: state.update_primary(r.name, body(r, ["name"]), False),
                                          kms_v1.UpdateCryptoKeyPrimaryVersionRequest, kms_v1.CryptoKey),
        "UpdateCryptoKeyVersion": (lambda r: state.update_version(r.crypto_key_version.name, ",".join(r.update_mask.paths),
                                                                  to_json(r.crypto_key_version), False),
                                   kms_v1.UpdateCryptoKeyVersionRequest, kms_v1.CryptoKeyVersion),
        "DestroyCryptoKeyVersion": (lambda r: state.destroy(r.name, {}, False),
                                    kms_v1.DestroyCryptoKeyVersionRequest, kms_v1.CryptoKeyVersion),
    }
    handlers = {n: handler(f, rq, rs, n) for n, (f, rq, rs) in methods.items()}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("google.cloud.kms.v1.KeyManagementService", handlers),))
    cert, key = tls
    bound = server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    return server, bound


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--grpc-port", type=int, default=None, help="also serve gRPC (TLS) on this port (0 = any)")
    p.add_argument("--tls", action="store_true", help="serve HTTPS instead of HTTP (CA in DIR/ca.pem)")
    p.add_argument("--dir", required=True, help="where to write sa.json, external.json, subject-token, ca.pem")
    p.add_argument("--key", action="append", help="CryptoKey to create at start (repeatable)")
    p.add_argument("--exit-on-stdin-eof", action="store_true")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    state = State(args)
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(state, args.verbose))
    httpd.daemon_threads = True
    port = httpd.server_address[1]
    write_files(state, args.dir, port, "https" if args.tls else "http")
    tls = make_tls(args.dir) if args.tls or args.grpc_port is not None else None
    if args.tls:
        import ssl
        cert_file, key_file = os.path.join(args.dir, "server.pem"), os.path.join(args.dir, "server-key.pem")
        for path, data in ((cert_file, tls[0]), (key_file, tls[1])):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                f.write(data)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    grpc_server = None
    if args.grpc_port is not None:
        grpc_server, gport = serve_grpc(state, tls, args.grpc_port)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(f"PORT {port}", flush=True)
    if grpc_server is not None:
        print(f"GRPC_PORT {gport}", flush=True)
    if args.exit_on_stdin_eof:
        sys.stdin.read()
    else:
        threading.Event().wait()


if __name__ == "__main__":
    main()
