#!/usr/bin/env python3
"""SMART Backend Services client helper for Fhirhose (needs only the `cryptography` package).

  smart-token.py jwks KEY.pem [KEY.pem ...]           print the JWKS to register (public keys)
  smart-token.py assertion --client-id ID --key KEY.pem --token-url URL
                                                      print a signed client assertion (valid 5 min)
  smart-token.py token --client-id ID --key KEY.pem --token-url URL --scope 'system/*.rs'
                                                      get an access token; prints the JSON response

KEY.pem is a PKCS#8 private key: RSA (signs RS384) or EC P-384 (ES384) / P-256 (ES256), e.g.
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-384 -out key.pem
The `kid` is the key's RFC 7638 SHA-256 thumbprint unless --kid is given; `fhirhose` computes the
same one.
"""

import argparse
import base64
import hashlib
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def int_bytes(n: int, length: int = 0) -> bytes:
    return n.to_bytes(max(length, (n.bit_length() + 7) // 8), "big")


def load_key(path):
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        return key, "RS384"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = {"secp384r1": "ES384", "secp256r1": "ES256"}.get(key.curve.name)
        if alg:
            return key, alg
    sys.exit(f"{path}: use an RSA or EC P-384 / P-256 private key")


def public_jwk(key, alg, kid=None):
    pub = key.public_key().public_numbers()
    if alg.startswith("RS"):
        members = {"e": b64url(int_bytes(pub.e)), "kty": "RSA", "n": b64url(int_bytes(pub.n))}
    else:
        size = 48 if alg == "ES384" else 32
        crv = "P-384" if alg == "ES384" else "P-256"
        members = {"crv": crv, "kty": "EC", "x": b64url(int_bytes(pub.x, size)),
                   "y": b64url(int_bytes(pub.y, size))}
    # RFC 7638: SHA-256 over the required members, sorted, no whitespace.
    thumb = b64url(hashlib.sha256(json.dumps(members, sort_keys=True, separators=(",", ":")).encode()).digest())
    return {**members, "kid": kid or thumb, "alg": alg, "use": "sig"}


def sign(key, alg, payload: bytes) -> bytes:
    if alg.startswith("RS"):
        return key.sign(payload, padding.PKCS1v15(), hashes.SHA384() if alg == "RS384" else hashes.SHA256())
    digest, size = (hashes.SHA384(), 48) if alg == "ES384" else (hashes.SHA256(), 32)
    r, s = decode_dss_signature(key.sign(payload, ec.ECDSA(digest)))
    return int_bytes(r, size) + int_bytes(s, size)  # JOSE wants r || s, not DER


def assertion(client_id, key_path, token_url, kid=None):
    key, alg = load_key(key_path)
    jwk = public_jwk(key, alg, kid)
    header = {"alg": alg, "typ": "JWT", "kid": jwk["kid"]}
    now = int(time.time())
    claims = {"iss": client_id, "sub": client_id, "aud": token_url, "iat": now,
              "exp": now + 300, "jti": str(uuid.uuid4())}
    signing_input = (b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())).encode()
    return signing_input.decode() + "." + b64url(sign(key, alg, signing_input))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("jwks")
    j.add_argument("keys", nargs="+")
    j.add_argument("--kid")
    for name in ("assertion", "token"):
        a = sub.add_parser(name)
        a.add_argument("--client-id", required=True)
        a.add_argument("--key", required=True)
        a.add_argument("--token-url", required=True)
        a.add_argument("--kid")
        if name == "token":
            a.add_argument("--scope", required=True)
    args = p.parse_args()

    if args.cmd == "jwks":
        keys = [public_jwk(*load_key(path), args.kid) for path in args.keys]
        print(json.dumps({"keys": keys}, indent=2))
        return
    jwt = assertion(args.client_id, args.key, args.token_url, args.kid)
    if args.cmd == "assertion":
        print(jwt)
        return
    body = urllib.parse.urlencode({
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": jwt,
        "scope": args.scope,
    }).encode()
    req = urllib.request.Request(args.token_url, data=body,
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            print(res.read().decode())
    except urllib.error.HTTPError as e:
        sys.exit(f"HTTP {e.code}: {e.read().decode()}")


if __name__ == "__main__":
    main()
