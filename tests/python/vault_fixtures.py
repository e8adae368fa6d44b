"""JWTs for the Vault JWT auth test (tests/vault_server.rs), signed with `cryptography`. (The
certificates for the cert-auth test come from tests/fakes/akeyless_fake.py --make-certs.)

  vault_fixtures.py signer DIR         an ES256 key pair: DIR/jwt-key.pem, DIR/jwt-pub.pem
  vault_fixtures.py jwt DIR ISS SUB AUD TTL_SECONDS   prints a JWT signed with DIR/jwt-key.pem
"""
import base64
import json
import sys
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def pem_key(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def signer(directory):
    d = Path(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    (d / "jwt-key.pem").write_bytes(pem_key(key))
    (d / "jwt-pub.pem").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(directory, iss, sub, aud, ttl):
    key = serialization.load_pem_private_key((Path(directory) / "jwt-key.pem").read_bytes(), None)
    now = int(time.time())
    header = {"alg": "ES256", "typ": "JWT"}
    claims = {"iss": iss, "sub": sub, "aud": aud, "iat": now, "nbf": now - 5, "exp": now + int(ttl)}
    signing_input = (
        b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    ).encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    print(signing_input.decode() + "." + b64url(signature))


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    {"signer": signer, "jwt": jwt}[command](*args)
