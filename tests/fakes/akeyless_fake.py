#!/usr/bin/env python3
"""A fake Akeyless API server for tests. Loopback only.

It speaks the wire format of the real API: every command is `POST <prefix>/<command>` with a JSON body
(any path prefix, e.g. /api/v2, is accepted), credentials travel in the body (`token`, `uid-token`),
errors are JSON `{"error": ...}` (sometimes with `"message"`) or plain text. Implemented commands:
auth (access_key, universal_identity, k8s, cert, jwt, aws_iam/azure_ad/gcp), encrypt, decrypt,
describe-item, rotate-key, create-dfc-key (AES keys only), list-items (minimal), and a Universal
Identity token tree: uid-generate-token, uid-rotate-token (with-manual-ack, send-manual-ack-token,
fork), uid-create-child-token, uid-list-children, uid-revoke-token (see the UID section).

Cryptography is real: AES-256-GCM per key version, the version travels inside the ciphertext, and the
encryption context is bound as associated data, so old ciphertexts decrypt after rotation and a wrong
context is refused.

Control API for tests (JSON in, JSON out):
  GET  /__control/stats                 calls per command, auth records (access types, cloud ids)
  POST /__control/reset-stats
  POST /__control/fail      {"command": "encrypt"|"*", "status": 503, "count": 2, "body": "...",
                             "content_type": "text/plain"}   next `count` calls fail
  POST /__control/latency   {"command": "*", "seconds": 1.5, "count": 1}  (count -1 = until cleared)
  POST /__control/expire-tokens         every issued `t-` token becomes invalid
  POST /__control/token-ttl {"seconds": 2, "expiration_format": "rfc3339"|"go"|"unix"|"none"}
  POST /__control/key       {"name": "k", "action": "create"|"disable"|"enable"|"delete"|"rotate"|
                             "deny"|"allow"|"delete-version", "version": 1, "type": "AES256GCM"}
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
import json
import os
import secrets
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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
    def __init__(self, status, error, message=None, plain=False):
        super().__init__(error)
        self.status = status
        self.error = error
        self.message = message
        self.plain = plain


class Key:
    def __init__(self, name, item_id, item_type="AES256GCM"):
        self.name = name
        self.item_id = item_id
        self.item_type = item_type
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
        self.latencies = []  # [{"command", "seconds", "count"}]

    def create_key(self, name, item_type="AES256GCM"):
        self.next_item_id += 1
        self.keys[name] = Key(name, self.next_item_id, item_type)
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
                raise ApiError(401, "failed to authenticate", "access key is invalid")
        elif access_type == "universal_identity":
            access_id, uid_node = uid_auth(self, body)
        elif access_type == "k8s":
            raw = b64d(body.get("k8s-service-account-token") or "", "k8s-service-account-token")
            if not body.get("k8s-auth-config-name") or raw.count(b".") != 2:
                raise ApiError(401, "failed to authenticate", "invalid k8s service account token or config name")
            record["k8s_auth_config_name"] = body["k8s-auth-config-name"]
        elif access_type == "cert":
            cert = b64d(body.get("cert-data") or "", "cert-data")
            key = b64d(body.get("key-data") or "", "key-data")
            if b"BEGIN CERTIFICATE" not in cert or b"PRIVATE KEY" not in key:
                raise ApiError(401, "failed to authenticate", "invalid certificate or key")
        elif access_type == "jwt":
            if not body.get("jwt"):
                raise ApiError(401, "failed to authenticate", "jwt is missing")
        elif access_type in ("aws_iam", "azure_ad", "gcp"):
            if not body.get("cloud-id"):
                raise ApiError(401, "failed to authenticate", "cloud-id is missing")
            record["cloud_id"] = body["cloud-id"]
            if access_type == "gcp":
                record["gcp_audience"] = body.get("gcp-audience")
        else:
            raise ApiError(400, "unsupported access type %s" % access_type)
        if access_type != "universal_identity" and not access_id:
            raise ApiError(400, "access-id is required")
        self.s.auth_records.append(record)
        out = self.s.issue_token(access_id, access_type)
        if uid_node is not None:
            self.s.tokens[out["token"]]["uid_node"] = uid_node
        return out

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
                return {"item_id": s.create_key(name, body.get("type", "AES256GCM")).item_id}
            key = s.keys.get(name)
            if key is None:
                raise ApiError(404, "no such key")
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
                    raise ApiError(404, "unknown command %s" % command, plain=True)
                self.inject(command)
                stall = self.uid_stall(command, body)
                if stall and stall["phase"] == "ack":  # the ack does not land while stalled
                    time.sleep(stall["seconds"])
                with api.s.lock:
                    api.s.calls[command] = api.s.calls.get(command, 0) + 1
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
                if e.plain:
                    return self.send(e.status, e.error.encode(), "text/plain")
                payload = {"error": e.error}
                if e.message:
                    payload["message"] = e.message
                self.send(e.status, payload)

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
                    if f["count"] > 0 and f["command"] in ("*", command):
                        f["count"] -= 1
                        fail = f
                        break
                api.s.calls["injected:" + command] = api.s.calls.get("injected:" + command, 0) + (
                    1 if fail or delay else 0)
            if delay:
                time.sleep(delay)
            if fail:
                body = fail["body"]
                if body is None:
                    body = {"error": "injected failure", "message": "status %d" % fail["status"]}
                if isinstance(body, str):
                    raise ApiError(fail["status"], body, plain=True)
                raise ApiError(fail["status"], body.get("error", ""), body.get("message"))

    return Handler


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
    args = p.parse_args()

    state = State(args)
    api = Api(state)
    if args.uid_token_file:
        tok = uid_control(api, "uid-token", {})["token"]
        fd = os.open(args.uid_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(tok)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(api, args.verbose))
    server.daemon_threads = True
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
