#!/usr/bin/env python3
"""A fake Akeyless API server for tests. Loopback only.

It speaks the wire format of the real API: every command is `POST <prefix>/<command>` with a JSON body
(any path prefix, e.g. /api/v2, is accepted), credentials travel in the body (`token`, `uid-token`),
errors are JSON `{"error": ...}` (sometimes with `"message"`) or plain text. Implemented commands:
auth (access_key, universal_identity, k8s, cert, jwt, aws_iam/azure_ad/gcp), encrypt, decrypt,
describe-item, rotate-key, uid-rotate-token, create-dfc-key (AES keys only), list-items (minimal).

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
  POST /__control/uid-token {"ttl": 3600}  → {"token": "u-..."} a new UID token (an auth method)
  POST /__control/uid-expire            every UID token becomes invalid
  GET  /__control/uid-tokens            → {"valid": n} number of live UID tokens

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
        self.uid_tokens = {}  # u- token → expiry ts
        self.uid_access_id = "p-uid" + secrets.token_hex(4)
        self.token_ttl = args.token_ttl
        self.uid_ttl = 3600.0
        self.expiration_format = args.expiration_format
        self.calls = {}
        self.auth_records = []
        self.failures = []  # [{"command", "status", "count", "body", "content_type"}]
        self.latencies = []  # [{"command", "seconds", "count"}]

    def create_key(self, name, item_type="AES256GCM"):
        self.next_item_id += 1
        self.keys[name] = Key(name, self.next_item_id, item_type)
        return self.keys[name]

    def new_uid_token(self, ttl=3600):
        tok = "u-" + secrets.token_urlsafe(24)
        self.uid_tokens[tok] = now() + ttl
        return tok

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
            exp = self.s.uid_tokens.get(body["uid-token"])
            if exp is None or exp < now():
                raise ApiError(401, "Unauthorized", "uid token is invalid or expired")
            return {"access_id": self.s.uid_access_id, "access_type": "universal_identity"}
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
        if access_type == "access_key":
            if access_id not in self.s.access_keys:
                raise ApiError(401, "failed to authenticate: access id %s not found" % access_id)
            if not secrets.compare_digest(str(body.get("access-key") or ""), self.s.access_keys[access_id]):
                raise ApiError(401, "failed to authenticate", "access key is invalid")
        elif access_type == "universal_identity":
            tok = body.get("uid-token") or body.get("uid_token")
            exp = self.s.uid_tokens.get(tok)
            if exp is None or exp < now():
                raise ApiError(401, "failed to authenticate", "universal identity token is invalid or expired")
            access_id = self.s.uid_access_id
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
        return self.s.issue_token(access_id, access_type)

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

    def uid_rotate_token(self, body):
        tok = body.get("uid-token") or body.get("uid_token")
        exp = self.s.uid_tokens.get(tok)
        if exp is None or exp < now():
            raise ApiError(401, "failed to rotate token", "universal identity token is invalid or expired")
        del self.s.uid_tokens[tok]
        return {"token": self.s.new_uid_token(self.s.uid_ttl)}

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
        "uid-rotate-token": "uid_rotate_token",
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
        if action == "uid-token":
            s.uid_ttl = float(body.get("ttl", 3600))
            return {"token": s.new_uid_token(s.uid_ttl)}
        if action == "uid-expire":
            s.uid_tokens.clear()
            return {}
        if action == "uid-tokens":
            return {"valid": sum(1 for e in s.uid_tokens.values() if e >= now())}
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
                if self.command != "POST" or command not in Api.COMMANDS:
                    raise ApiError(404, "unknown command %s" % command, plain=True)
                self.inject(command)
                with api.s.lock:
                    api.s.calls[command] = api.s.calls.get(command, 0) + 1
                    out = getattr(api, Api.COMMANDS[command])(body)
                self.send(200, out)
            except ApiError as e:
                if e.plain:
                    return self.send(e.status, e.error.encode(), "text/plain")
                payload = {"error": e.error}
                if e.message:
                    payload["message"] = e.message
                self.send(e.status, payload)

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
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when the parent closes stdin (or dies)")
    args = p.parse_args()

    state = State(args)
    api = Api(state)
    if args.uid_token_file:
        tok = state.new_uid_token()
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
