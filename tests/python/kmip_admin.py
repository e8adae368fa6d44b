"""Administers keys on a PyKMIP server for tests/kmip_server.rs, through PyKMIP's own client.

Usage: kmip_admin.py HOST PORT CERT_DIR COMMAND [ARGS...]
  create NAME        a new AES-256 key named NAME (encrypt + decrypt), activated; prints its uid
  create-inactive NAME   as create, left Pre-Active
  revoke UID         revoke (reason: key compromise = False, cessation of operation)
  destroy UID        revoke then destroy
  state UID          prints the state name
"""
import sys
import warnings

warnings.simplefilter("ignore")

from kmip import enums  # noqa: E402
from kmip.pie.client import ProxyKmipClient  # noqa: E402


def main():
    host, port, certs, cmd = sys.argv[1:5]
    args = sys.argv[5:]
    client = ProxyKmipClient(
        hostname=host,
        port=int(port),
        cert=f"{certs}/client.pem",
        key=f"{certs}/client-key.pem",
        ca=f"{certs}/ca.pem",
        ssl_version="PROTOCOL_TLSv1_2",
        kmip_version=enums.KMIPVersion.KMIP_1_2,
    )
    with client:
        if cmd in ("create", "create-inactive"):
            uid = client.create(
                enums.CryptographicAlgorithm.AES,
                256,
                name=args[0],
                cryptographic_usage_mask=[
                    enums.CryptographicUsageMask.ENCRYPT,
                    enums.CryptographicUsageMask.DECRYPT,
                ],
            )
            if cmd == "create":
                client.activate(uid)
            print(uid)
        elif cmd == "revoke":
            client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, args[0])
        elif cmd == "destroy":
            try:
                client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, args[0])
            except Exception:
                pass  # already revoked, or never activated
            client.destroy(args[0])
        elif cmd == "state":
            attrs = client.get_attributes(args[0], ["State"])[1]
            print(attrs[0].attribute_value.value.name)
        else:
            sys.exit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
