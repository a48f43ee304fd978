#!/usr/bin/python3
# An independent JWE implementation (python3-jwcrypto) for tests/crypto/test_jose.cpp. One JSON request on stdin
# (the key travels here, never in argv):
#   {"op": "decrypt", "key": "<hex>", "jwe": "<compact>"}                    -> the plaintext in hex
#   {"op": "encrypt", "key": "<hex>", "header": {...}, "plaintext": "<hex>"} -> a compact JWE (alg dir, enc A256GCM)
# Exits 1 with the reason on stderr when jwcrypto refuses the object.
import json
import sys

from jwcrypto import jwe, jwk
from jwcrypto.common import base64url_encode, json_encode

request = json.load(sys.stdin)
key = jwk.JWK(kty="oct", k=base64url_encode(bytes.fromhex(request["key"])))
try:
    if request["op"] == "decrypt":
        token = jwe.JWE()
        token.deserialize(request["jwe"], key=key)
        print(token.payload.hex())
    elif request["op"] == "encrypt":
        token = jwe.JWE(bytes.fromhex(request["plaintext"]), protected=json_encode(request["header"]))
        token.add_recipient(key)
        print(token.serialize(compact=True))
    else:
        sys.exit("unknown op " + request["op"])
except Exception as error:  # jwcrypto's refusals have several types; the test only needs "refused" and why
    sys.exit("jwcrypto refused: %s: %s" % (type(error).__name__, error))
