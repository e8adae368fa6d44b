#!/usr/bin/env python3
"""A stand-in for Azure Key Vault / Managed HSM, Entra ID and the instance metadata service, for
tests. Loopback only.

Wire protocol, as the official clients (azure-keyvault-keys, azure_security_keyvault_keys) use it:
  Key Vault   HTTPS only (CA in DIR/ca.pem), `api-version` 7.4 / 7.5 / 7.6 / 2025-07-01 (others are
              refused), JSON bodies, bytes as base64url. Every request without a bearer token gets
              the challenge Key Vault sends: 401 with `WWW-Authenticate: Bearer
              authorization="https://login.microsoftonline.com/TENANT", resource="RESOURCE"`
              (RESOURCE https://vault.azure.net, or https://managedhsm.azure.net with --hsm).
              Errors are `{"error": {"code", "message", "innererror"?}}` with Key Vault's status:
              a disabled version 403 Forbidden/KeyDisabled (for an RSA key only on unwrapKey:
              Key Vault still wraps with the public key), expired 403 Forbidden/KeyExpired,
              not yet valid 403 Forbidden/KeyNotYetValid, a missing or deleted key 404
              KeyNotFound, no permission 403 Forbidden/ForbiddenByRbac, a bad token 401
              Unauthorized.
  Entra ID    on the same HTTPS port: GET /TENANT/v2.0/.well-known/openid-configuration (MSAL),
              POST /TENANT/oauth2/v2.0/token with grant_type=client_credentials and either
              client_secret (service principal, DIR/client-secret) or a client_assertion
              (workload identity: the JWT in DIR/federated-token, signed by the stand-in's
              "cluster issuer", audience api://AzureADTokenExchange). Scope must be
              RESOURCE/.default. Errors in Entra ID's shape (`error`, `error_description` with an
              AADSTS code).
  IMDS        plain HTTP on a second port: GET /metadata/identity/oauth2/token?api-version=...
              &resource=RESOURCE[&client_id=ID] with `Metadata: true`.
  Access tokens are RS256 JWTs the stand-in signs (aud RESOURCE, tid, exp); Key Vault checks
  signature, audience, tenant and expiry.

Keys: RSA (RSA-OAEP-256 / RSA-OAEP wrap, real RSA-2048 per version) and, with --hsm, oct-HSM
(A256KW, real AES-256 key wrap). Every version has enabled / nbf / exp attributes.

On start it writes DIR/ca.pem, DIR/client-secret, DIR/federated-token, DIR/ids.json (tenant,
client IDs) and prints `PORT n` and `IMDS_PORT m`.

Control API for tests (JSON, on the HTTPS port):
  GET  /__control/stats
  POST /__control/key   {"name", "action": "create"|"rotate"|"disable"|"enable"|"expire"|
                         "not-yet-valid"|"delete"|"deny"|"allow"|"drop-ops", "version": V, "kty"}
                         -> {"kid", "version"}
  POST /__control/fail  {"method": "wrap"|"unwrap"|"get"|"token"|"imds"|"*", "status": 403,
                         "count": 1, "body": "<html>..", "content_type": "text/html"}
                         (a proxy's answer; count -1 = until cleared; without body: empty)
  POST /__control/latency {"method": ..., "seconds": 10, "count": 1}
  POST /__control/clear-faults
  POST /__control/token-ttl {"seconds": 3}
"""

import argparse
import base64
import datetime
import ipaddress
import json
import os
import re
import secrets
import ssl
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap
from cryptography.x509.oid import NameOID

API_VERSIONS = {"7.4", "7.5", "7.6", "2025-07-01"}
NAME_RE = re.compile(r"^[0-9a-zA-Z-]{1,127}$")
VERSION_RE = re.compile(r"^[0-9a-f]{32}$")
ALL_OPS = ["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"]
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class KvError(Exception):
    def __init__(self, http, code, message, inner=None, raw=None, content_type="application/json",
                 headers=None):
        super().__init__(message)
        self.http, self.code, self.message, self.inner = http, code, message, inner
        self.raw, self.content_type, self.headers = raw, content_type, headers or {}

    def body(self):
        if self.raw is not None:
            return self.raw
        err = {"code": self.code, "message": self.message}
        if self.inner:
            err["innererror"] = {"code": self.inner}
        return json.dumps({"error": err}).encode()


class AadError(KvError):
    def __init__(self, http, error, aadsts, description):
        super().__init__(http, error, description)
        self.aadsts = aadsts

    def body(self):
        return json.dumps({"error": self.code,
                           "error_description": f"AADSTS{self.aadsts}: {self.message}",
                           "error_codes": [self.aadsts], "timestamp": now_iso(),
                           "trace_id": str(uuid.uuid4()), "correlation_id": str(uuid.uuid4())}).encode()


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def b64u(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_decode(s, field):
    if not isinstance(s, str) or not s:
        raise KvError(400, "BadParameter", f"Property '{field}' is required.")
    try:
        return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    except Exception:
        raise KvError(400, "BadParameter", f"Property '{field}' is not valid base64url.")


def int_bytes(n):
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


class Version:
    def __init__(self, key, kty, ops, attrs):
        self.key, self.kty = key, kty
        self.id = uuid.uuid4().hex
        self.ops = list(ops)
        self.enabled = attrs.get("enabled", True)
        self.nbf, self.exp = attrs.get("nbf"), attrs.get("exp")
        self.created = self.updated = int(time.time())
        if kty in ("RSA", "RSA-HSM"):
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.private = None
            self.secret = os.urandom(32)

    def kid(self, base):
        return f"{base}/keys/{self.key.name}/{self.id}"

    def bundle(self, base):
        jwk = {"kid": self.kid(base), "kty": self.kty, "key_ops": self.ops}
        if self.private is not None:
            pub = self.private.public_key().public_numbers()
            jwk["n"], jwk["e"] = b64u(int_bytes(pub.n)), b64u(int_bytes(pub.e))
        attrs = {"enabled": self.enabled, "created": self.created, "updated": self.updated,
                 "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90}
        if self.nbf is not None:
            attrs["nbf"] = self.nbf
        if self.exp is not None:
            attrs["exp"] = self.exp
        return {"key": jwk, "attributes": attrs, "tags": self.key.tags}

    def usable(self, op):
        t = time.time()
        # Key Vault still performs public-key operations (wrapKey, encrypt) with a disabled RSA key
        # and refuses those that need the private key; a symmetric key is refused for both.
        if not self.enabled and not (op == "wrapKey" and self.private is not None):
            raise KvError(403, "Forbidden", f"Operation {op} is not allowed on a disabled key.",
                          inner="KeyDisabled")
        if self.exp is not None and self.exp <= t:
            raise KvError(403, "Forbidden", f"Operation {op} is not allowed on an expired key.",
                          inner="KeyExpired")
        if self.nbf is not None and self.nbf > t:
            raise KvError(403, "Forbidden", f"Operation {op} is not allowed on a key that is not yet valid.",
                          inner="KeyNotYetValid")
        if op not in self.ops:
            raise KvError(403, "Forbidden", f"Operation {op} is not permitted on this key.",
                          inner="KeyOperationForbidden")

    def wrap(self, alg, value):
        if self.private is not None:
            if alg not in ("RSA-OAEP-256", "RSA-OAEP"):
                raise KvError(400, "BadParameter", f"Algorithm {alg} is not supported for key type {self.kty}.")
            h = hashes.SHA256() if alg == "RSA-OAEP-256" else hashes.SHA1()
            return self.private.public_key().encrypt(value, padding.OAEP(padding.MGF1(h), h, None))
        if alg != "A256KW":
            raise KvError(400, "BadParameter", f"Algorithm {alg} is not supported for key type {self.kty}.")
        if len(value) % 8 or len(value) < 16:
            raise KvError(400, "BadParameter", "The value length must be a multiple of 8 bytes, at least 16.")
        return aes_key_wrap(self.secret, value)

    def unwrap(self, alg, value):
        try:
            if self.private is not None:
                if alg not in ("RSA-OAEP-256", "RSA-OAEP"):
                    raise KvError(400, "BadParameter", f"Algorithm {alg} is not supported for key type {self.kty}.")
                h = hashes.SHA256() if alg == "RSA-OAEP-256" else hashes.SHA1()
                return self.private.decrypt(value, padding.OAEP(padding.MGF1(h), h, None))
            if alg != "A256KW":
                raise KvError(400, "BadParameter", f"Algorithm {alg} is not supported for key type {self.kty}.")
            return aes_key_unwrap(self.secret, value)
        except KvError:
            raise
        except Exception:
            raise KvError(400, "BadParameter", "Error unwrapping the value.")


class Key:
    def __init__(self, name):
        self.name, self.versions, self.tags = name, [], {}
        self.deleted, self.denied = False, False


class State:
    def __init__(self, args):
        self.lock = threading.RLock()
        self.hsm = args.hsm
        self.resource = "https://managedhsm.azure.net" if args.hsm else "https://vault.azure.net"
        self.tenant = str(uuid.uuid4())
        self.sp_client = str(uuid.uuid4())
        self.wi_client = str(uuid.uuid4())
        self.mi_client = str(uuid.uuid4())
        self.client_secret = "kv~" + secrets.token_urlsafe(30)
        self.aad_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.issuer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.cluster_issuer = "https://oidc.kms-plugin.test/cluster"
        self.keys = {}
        self.token_ttl = 3600
        self.faults, self.latency = [], []
        self.stats = {"calls": {}, "issued": {}, "refused": {}, "challenges": 0}
        self.base = None
        for k in args.key or []:
            self.create(k, "oct-HSM" if args.hsm else "RSA", ALL_OPS, {})

    def count(self, group, name):
        with self.lock:
            self.stats[group][name] = self.stats[group].get(name, 0) + 1

    # ---- tokens ----

    def jwt(self, key, claims, kid="kv-fake"):
        header = {"alg": "RS256", "typ": "JWT", "kid": kid}
        signing = f"{b64u(json.dumps(header).encode())}.{b64u(json.dumps(claims).encode())}"
        sig = key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing}.{b64u(sig)}"

    def verify_jwt(self, key, token):
        parts = token.split(".")
        if len(parts) != 3:
            return None
        try:
            header = json.loads(base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)))
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
            sig = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
            if header.get("alg") != "RS256":
                return None
            key.public_key().verify(sig, f"{parts[0]}.{parts[1]}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except Exception:
            return None
        return claims

    def issue(self, grant, app):
        t = int(time.time())
        with self.lock:
            ttl = self.token_ttl
            self.stats["issued"][grant] = self.stats["issued"].get(grant, 0) + 1
        claims = {"aud": self.resource, "iss": f"https://sts.windows.net/{self.tenant}/", "iat": t,
                  "nbf": t, "exp": t + ttl, "tid": self.tenant, "appid": app, "oid": app,
                  "jti": secrets.token_hex(8)}
        return self.jwt(self.aad_key, claims), ttl

    def federated_token(self):
        t = int(time.time())
        return self.jwt(self.issuer_key, {"iss": self.cluster_issuer, "aud": [FEDERATED_AUDIENCE],
                                          "sub": "system:serviceaccount:kube-system:kms-plugin",
                                          "iat": t, "nbf": t, "exp": t + 86400}, kid="cluster")

    def authorize(self, header):
        challenge = (f'Bearer authorization="https://login.microsoftonline.com/{self.tenant}", '
                     f'resource="{self.resource}"')
        if not header:
            with self.lock:
                self.stats["challenges"] += 1
            raise KvError(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.",
                          headers={"WWW-Authenticate": challenge})
        scheme, _, tok = header.partition(" ")
        claims = self.verify_jwt(self.aad_key, tok) if scheme == "Bearer" else None
        if claims is None:
            self.count("refused", "invalid")
            raise KvError(401, "Unauthorized", "AKV10022: Invalid audience or signature.",
                          headers={"WWW-Authenticate": challenge})
        if claims.get("aud") not in (self.resource, self.resource + "/"):
            self.count("refused", "audience")
            raise KvError(401, "Unauthorized", f"AKV10022: Invalid audience. Expected {self.resource}, found: {claims.get('aud')}.",
                          headers={"WWW-Authenticate": challenge})
        if claims.get("tid") != self.tenant:
            self.count("refused", "tenant")
            raise KvError(401, "Unauthorized", "AKV10032: Invalid issuer.", headers={"WWW-Authenticate": challenge})
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= time.time():
            self.count("refused", "expired")
            raise KvError(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token. The token is expired.",
                          headers={"WWW-Authenticate": challenge})

    def token_endpoint(self, path, form):
        m = re.match(r"^/([^/]+)/oauth2/v2\.0/token$", path)
        if not m:
            return None
        if m.group(1) != self.tenant:
            raise AadError(400, "invalid_request", 90002, f"Tenant '{m.group(1)}' not found.")
        if form.get("grant_type") != "client_credentials":
            raise AadError(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        scopes = form.get("scope", "").split()
        want = self.resource + "/.default"
        if want not in scopes or any(s not in (want, "openid", "profile", "offline_access") for s in scopes):
            raise AadError(400, "invalid_scope", 70011, f"The provided value for scope {form.get('scope')!r} is not valid.")
        client = form.get("client_id")
        if "client_secret" in form:
            if client != self.sp_client:
                raise AadError(400, "unauthorized_client", 700016, f"Application with identifier '{client}' was not found.")
            if form["client_secret"] != self.client_secret:
                self.count("refused", "secret")
                raise AadError(401, "invalid_client", 7000215, "Invalid client secret provided.")
            tok, ttl = self.issue("client_secret", client)
        elif form.get("client_assertion_type") == ASSERTION_TYPE and "client_assertion" in form:
            if client != self.wi_client:
                raise AadError(400, "unauthorized_client", 700016, f"Application with identifier '{client}' was not found.")
            claims = self.verify_jwt(self.issuer_key, form["client_assertion"])
            aud = claims.get("aud") if claims else None
            if (claims is None or claims.get("iss") != self.cluster_issuer
                    or FEDERATED_AUDIENCE not in (aud if isinstance(aud, list) else [aud])
                    or claims.get("exp", 0) <= time.time()):
                self.count("refused", "assertion")
                raise AadError(401, "invalid_client", 700211, "No matching federated identity record found for presented assertion.")
            tok, ttl = self.issue("workload_identity", client)
        else:
            raise AadError(401, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
        return {"token_type": "Bearer", "expires_in": ttl, "ext_expires_in": ttl, "access_token": tok}

    def imds(self, path, query, headers):
        if path != "/metadata/identity/oauth2/token":
            raise KvError(404, "NotFound", "not found", raw=b"", content_type="text/plain")
        if headers.get("X-Forwarded-For") is not None:
            # IMDS refuses anything that came through a proxy.
            raise AadError(400, "invalid_request", 0, "Request not allowed: X-Forwarded-For header present")
        if headers.get("Metadata") != "true":
            raise AadError(400, "invalid_request", 0, "Required metadata header not specified")
        if query.get("api-version") not in ("2018-02-01", "2019-08-01"):
            raise AadError(400, "invalid_request", 0, "Invalid API version")
        resource = query.get("resource", "").rstrip("/")
        if resource != self.resource:
            raise AadError(400, "invalid_resource", 500011, f"The resource principal named {resource} was not found.")
        cid = query.get("client_id")
        if cid is not None and cid != self.mi_client:
            raise AadError(400, "invalid_request", 0, "Identity not found")
        tok, ttl = self.issue("managed_identity", cid or "system-assigned")
        t = int(time.time())
        return {"access_token": tok, "client_id": cid or self.mi_client, "expires_in": str(ttl),
                "expires_on": str(t + ttl), "ext_expires_in": str(ttl), "not_before": str(t),
                "resource": self.resource, "token_type": "Bearer"}

    # ---- keys ----

    def create(self, name, kty, ops, attrs):
        if not NAME_RE.match(name or ""):
            raise KvError(400, "BadParameter", "The request URI contains an invalid name: " + str(name))
        allowed = ("RSA-HSM", "oct-HSM") if self.hsm else ("RSA", "RSA-HSM")
        if kty not in allowed:
            raise KvError(400, "BadParameter", f"The specified key type {kty} is not supported here.")
        with self.lock:
            k = self.keys.get(name)
            if k is not None and k.deleted:
                raise KvError(409, "Conflict", f"Key {name} is currently in a deleted but recoverable state.")
            if k is None:
                k = self.keys[name] = Key(name)
            v = Version(k, kty, ops, attrs)
            k.versions.append(v)
            return v

    def key(self, name, op):
        k = self.keys.get(name)
        if k is None or k.deleted:
            raise KvError(404, "KeyNotFound", f"A key with (name/id) {name} was not found in this key vault. "
                          "If you recently deleted this key you may be able to recover it using the correct "
                          "recovery command.")
        if k.denied:
            raise KvError(403, "Forbidden", f"Caller is not authorized to perform action on resource. "
                          f"Action: 'Microsoft.KeyVault/vaults/keys/{op}/action'", inner="ForbiddenByRbac")
        return k

    def version(self, name, version, op):
        k = self.key(name, op)
        if not version:
            return k.versions[-1]
        for v in k.versions:
            if v.id == version:
                return v
        raise KvError(404, "KeyNotFound", f"A key with (name/id) {name}/{version} was not found in this key vault.")

    def control(self, action, body):
        with self.lock:
            if action == "stats":
                return self.stats
            if action == "token-ttl":
                self.token_ttl = int(body["seconds"])
                return {}
            if action == "fail":
                self.faults.append(dict(body))
                return {}
            if action == "latency":
                self.latency.append(dict(body))
                return {}
            if action == "clear-faults":
                self.faults, self.latency = [], []
                return {}
            if action != "key":
                raise KvError(404, "NotFound", "unknown control action")
            name, what = body["name"], body["action"]
            if what == "create":
                v = self.create(name, body.get("kty", "oct-HSM" if self.hsm else "RSA"), body.get("ops", ALL_OPS), {})
            elif what == "rotate":
                k = self.keys[name]
                v = self.create(name, k.versions[-1].kty, k.versions[-1].ops, {})
            else:
                k = self.keys[name]
                v = self.version(name, body.get("version"), "get") if what not in ("deny", "allow", "delete") else k.versions[-1]
                if what == "disable":
                    v.enabled = False
                elif what == "enable":
                    v.enabled, v.exp, v.nbf = True, None, None
                elif what == "expire":
                    v.exp = int(time.time()) - 3600
                elif what == "not-yet-valid":
                    v.nbf = int(time.time()) + 3600
                elif what == "drop-ops":
                    v.ops = ["encrypt", "decrypt"]
                elif what == "delete":
                    k.deleted = True
                elif what == "deny":
                    k.denied = True
                elif what == "allow":
                    k.denied = False
                else:
                    raise KvError(400, "BadParameter", f"unknown key action {what}")
            return {"kid": v.kid(self.base), "version": v.id}

    def take(self, lst, method):
        with self.lock:
            for f in lst:
                if f["method"] in ("*", method) and f.get("count", 1) != 0:
                    if f.get("count", 1) > 0:
                        f["count"] = f.get("count", 1) - 1
                    return f
        return None

    def keyvault(self, method, path, query, body):
        parts = path.split("/")[1:]  # keys, NAME, [VERSION], [op]
        if not parts or parts[0] not in ("keys", "deletedkeys"):
            raise KvError(404, "NotFound", "not found", raw=b"<html>404 Not Found</html>", content_type="text/html")
        if query.get("api-version") not in API_VERSIONS:
            raise KvError(400, "BadParameter", f"The specified version ({query.get('api-version')}) is not recognized. "
                          "Consider using the latest supported version.")
        if parts[0] == "deletedkeys":
            with self.lock:
                k = self.keys.get(parts[1]) if len(parts) > 1 else None
                if method != "GET" or k is None or not k.deleted:
                    raise KvError(404, "KeyNotFound", f"Deleted Key not found: {parts[1] if len(parts) > 1 else ''}")
                out = k.versions[-1].bundle(self.base)
                out["recoveryId"] = f"{self.base}/deletedkeys/{k.name}"
                return out
        name = parts[1] if len(parts) > 1 else ""
        rest = [p for p in parts[2:]]
        with self.lock:
            if method == "POST" and rest == ["create"]:
                self.count("calls", "create")
                unknown = set(body) - {"kty", "key_size", "key_ops", "attributes", "tags", "crv",
                                       "public_exponent", "release_policy"}
                if unknown:
                    raise KvError(400, "BadParameter", f"Unknown properties: {sorted(unknown)}")
                v = self.create(name, body.get("kty"), body.get("key_ops") or ALL_OPS, body.get("attributes") or {})
                v.key.tags = body.get("tags") or {}
                return v.bundle(self.base)
            if method == "POST" and rest == ["rotate"]:
                self.count("calls", "rotate")
                k = self.key(name, "rotate")
                v = self.create(name, k.versions[-1].kty, k.versions[-1].ops, {})
                return v.bundle(self.base)
            if method == "DELETE" and rest in ([], [""]):
                self.count("calls", "delete")
                k = self.key(name, "delete")
                k.deleted = True
                out = k.versions[-1].bundle(self.base)
                out["recoveryId"] = f"{self.base}/deletedkeys/{name}"
                return out
            if method == "GET" and len(rest) <= 1:
                self.count("calls", "get")
                return self.version(name, rest[0] if rest else "", "read").bundle(self.base)
            if method == "PATCH" and len(rest) <= 1:
                self.count("calls", "update")
                v = self.version(name, rest[0] if rest else "", "update")
                a = body.get("attributes") or {}
                if "enabled" in a:
                    v.enabled = bool(a["enabled"])
                if "exp" in a:
                    v.exp = a["exp"]
                if "nbf" in a:
                    v.nbf = a["nbf"]
                if body.get("key_ops"):
                    v.ops = list(body["key_ops"])
                if "tags" in body:
                    v.key.tags = body["tags"] or {}
                v.updated = int(time.time())
                return v.bundle(self.base)
            if method == "POST" and len(rest) == 2 and rest[1] in ("wrapkey", "unwrapkey"):
                op = "wrapKey" if rest[1] == "wrapkey" else "unwrapKey"
                self.count("calls", op)
                unknown = set(body) - {"alg", "value"}
                if unknown or "alg" not in body:
                    raise KvError(400, "BadParameter", "The request body must have 'alg' and 'value' only.")
                v = self.version(name, rest[0], op)
                v.usable(op)
                value = b64u_decode(body.get("value"), "value")
                out = v.wrap(body["alg"], value) if op == "wrapKey" else v.unwrap(body["alg"], value)
                return {"kid": v.kid(self.base), "value": b64u(out)}
        raise KvError(405, "MethodNotAllowed", "The requested method is not allowed.",
                      raw=b"<html>405 Method Not Allowed</html>", content_type="text/html")


def method_of(method, path):
    if path.endswith("/wrapkey"):
        return "wrap"
    if path.endswith("/unwrapkey"):
        return "unwrap"
    return "get" if method == "GET" else "admin"


def make_handler(state, verbose, imds_only):
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *a):
            if verbose:
                sys.stderr.write("azure-fake: " + (fmt % a) + "\n")

        def send(self, status, payload, content_type="application/json", headers=None):
            data = json.dumps(payload).encode() if isinstance(payload, (dict, list)) else (payload or b"")
            self.send_response(status)
            self.send_header("Content-Type", content_type + ("; charset=utf-8" if content_type == "application/json" else ""))
            self.send_header("Content-Length", str(len(data)))
            if not imds_only:
                self.send_header("x-ms-keyvault-service-version", "1.9.0.0")
                self.send_header("x-ms-request-id", str(uuid.uuid4()))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.dispatch("GET")

        def do_POST(self):
            self.dispatch("POST")

        def do_PATCH(self):
            self.dispatch("PATCH")

        def do_DELETE(self):
            self.dispatch("DELETE")

        def dispatch(self, method):
            url = urlsplit(self.path)
            path = unquote(url.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                if imds_only:
                    op = "imds"
                elif path.startswith("/__control/"):
                    return self.send(200, state.control(path[len("/__control/"):], json.loads(raw or b"{}")))
                elif re.match(r"^/[^/]+/(oauth2/v2\.0/token|v2\.0/\.well-known/openid-configuration)$", path):
                    op = "token"
                else:
                    # An empty version segment (`/keys/k//wrapkey`, `/keys/k/`) is the latest.
                    op = method_of(method, path)
                hold = state.take(state.latency, op)
                if hold:
                    time.sleep(float(hold["seconds"]))
                fault = state.take(state.faults, op)
                if fault:
                    b = fault.get("body")
                    data = b.encode() if isinstance(b, str) else (json.dumps(b).encode() if b is not None else b"")
                    return self.send(int(fault["status"]), data, fault.get("content_type", "text/html"))
                if imds_only:
                    return self.send(200, state.imds(path, query, self.headers))
                if op == "token":
                    if path.endswith("openid-configuration"):
                        tenant = path.split("/")[1]
                        return self.send(200, {
                            "token_endpoint": f"{state.base}/{tenant}/oauth2/v2.0/token",
                            "authorization_endpoint": f"{state.base}/{tenant}/oauth2/v2.0/authorize",
                            "issuer": f"{state.base}/{tenant}/v2.0",
                            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"]})
                    if method != "POST":
                        raise AadError(405, "invalid_request", 900561, "The endpoint only accepts POST requests.")
                    form = {k: v[0] for k, v in parse_qs(raw.decode(errors="replace")).items()}
                    return self.send(200, state.token_endpoint(path, form))
                state.authorize(self.headers.get("Authorization"))
                try:
                    body = json.loads(raw) if raw else {}
                except ValueError:
                    raise KvError(400, "BadParameter", "The request body is not valid JSON.")
                if not isinstance(body, dict):
                    raise KvError(400, "BadParameter", "The request body must be a JSON object.")
                self.send(200, state.keyvault(method, path, query, body))
            except KvError as e:
                self.send(e.http, e.body(), e.content_type, e.headers)

    return H


def make_tls(d):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    t = datetime.datetime.now(datetime.timezone.utc)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "azure-keyvault-fake test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(t - datetime.timedelta(minutes=5))
          .not_valid_after(t + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(t - datetime.timedelta(minutes=5)).not_valid_after(t + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    with open(os.path.join(d, "ca.pem"), "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    cert_file, key_file = os.path.join(d, "server.pem"), os.path.join(d, "server-key.pem")
    for path, data in ((cert_file, cert.public_bytes(serialization.Encoding.PEM)),
                       (key_file, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))):
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


class TlsServer(ThreadingHTTPServer):
    """Handshakes in the request thread, so a slow client cannot stall accept()."""

    def __init__(self, addr, handler, ctx):
        super().__init__(addr, handler)
        self.ctx = ctx

    def finish_request(self, request, client_address):
        try:
            request = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        self.RequestHandlerClass(request, client_address, self)


def write_secret(path, content):
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(content)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--imds-port", type=int, default=0)
    p.add_argument("--dir", required=True)
    p.add_argument("--key", action="append", help="key to create at start (repeatable)")
    p.add_argument("--hsm", action="store_true", help="act as a Managed HSM (oct-HSM keys, managedhsm resource)")
    p.add_argument("--exit-on-stdin-eof", action="store_true")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    state = State(args)
    ctx = make_tls(args.dir)
    httpd = TlsServer(("127.0.0.1", args.port), make_handler(state, args.verbose, False), ctx)
    httpd.daemon_threads = True
    imds = ThreadingHTTPServer(("127.0.0.1", args.imds_port), make_handler(state, args.verbose, True))
    imds.daemon_threads = True
    port, iport = httpd.server_address[1], imds.server_address[1]
    state.base = f"https://127.0.0.1:{port}"
    write_secret(os.path.join(args.dir, "client-secret"), state.client_secret)
    write_secret(os.path.join(args.dir, "federated-token"), state.federated_token())
    with open(os.path.join(args.dir, "ids.json"), "w") as f:
        json.dump({"tenant": state.tenant, "sp_client": state.sp_client, "wi_client": state.wi_client,
                   "mi_client": state.mi_client, "resource": state.resource}, f)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    threading.Thread(target=imds.serve_forever, daemon=True).start()
    print(f"PORT {port}", flush=True)
    print(f"IMDS_PORT {iport}", flush=True)
    if args.exit_on_stdin_eof:
        sys.stdin.read()
    else:
        threading.Event().wait()


if __name__ == "__main__":
    main()
