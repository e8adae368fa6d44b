"""Recomputes the SigV4 signature of an Akeyless AWS cloud-id with botocore (the signer of the
official AWS SDK for Python), independently of the plugin.

stdin: JSON {"cloud_id", "access_key", "secret_key"}; stdout: JSON {"signature", "signed_headers",
"credential_scope"} as botocore computes them for the request the cloud-id describes.
"""
import base64
import json
import sys

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


def main():
    args = json.load(sys.stdin)
    doc = json.loads(base64.b64decode(args["cloud_id"]))
    url = base64.b64decode(doc["sts_request_url"]).decode()
    body = base64.b64decode(doc["sts_request_body"])
    headers = json.loads(base64.b64decode(doc["sts_request_headers"]))
    auth_header = headers.pop("Authorization")[0]
    scope = auth_header.split("Credential=")[1].split(",")[0].split("/")
    region, service = scope[2], scope[3]
    token = headers.get("X-Amz-Security-Token", [None])[0]
    creds = Credentials(args["access_key"], args["secret_key"], token)
    req = AWSRequest(method=doc["sts_request_method"], url=url, data=body)
    for name, values in headers.items():
        req.headers[name] = values[0]
    signer = SigV4Auth(creds, service, region)
    # The time the cloud-id was signed at: botocore reads it from the request context.
    req.context["timestamp"] = headers["X-Amz-Date"][0]
    canonical = signer.canonical_request(req)
    string_to_sign = signer.string_to_sign(req, canonical)
    out = {
        "signature": signer.signature(string_to_sign, req),
        "signed_headers": signer.signed_headers(signer.headers_to_sign(req)),
        "credential_scope": signer.credential_scope(req),
    }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
