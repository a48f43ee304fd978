#!/usr/bin/python3
# An independent ESPrim peer for tests/rspf/test_esprim_jwcrypto.cpp: python3-jwcrypto for the JWE, Python's hmac
# and hashlib for sessionESPrimKey = HMAC-SHA-256(pairwise, canon(receiver) || canon(originator) || label), where
# canon() is the JSON text with sorted members and no spaces (docs/PROTOCOL.md §7). One JSON request on stdin (the
# pairwise key travels here, never in argv), one JSON answer on stdout:
#   {"op": "open", "pairwise": "<hex>", "receiver_rand": {...}, "originator_rand": {...} (when the header has no
#    oro), "jwe": "<compact>", "cty": "<expected cty>", "expect": {"kid": ..., "seq": ...} (optional)}
#     -> {"header": {...}, "plaintext": "<text>"}
#   {"op": "make", "pairwise": "<hex>", "receiver_rand": {...}, "originator_rand": {...} (optional: a new one is
#    made), "kid": "...", "seq": N, "oro": true|false, "plaintext": "<text>", "tamper": "" | "header" | "iv" |
#    "ciphertext" | "tag" | "kid" | "ori" | "rri"}
#     -> {"jwe": "<compact>", "originator_rand": {...}}
# Exits 1 with the reason on stderr when a check fails or jwcrypto refuses the object.
import base64
import hashlib
import hmac
import json
import os
import sys

from jwcrypto import jwe, jwk
from jwcrypto.common import json_encode

LABEL = b"oneM2M HMAC-SHA256 sessionESPrimKey derivation algorithm"
REQUEST = "application/vnd.onem2m-preq+json"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def canonical(rand):
    return json.dumps(rand, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def session_key(pairwise, receiver, originator):
    digest = hmac.new(pairwise, canonical(receiver) + canonical(originator) + LABEL, hashlib.sha256).digest()
    return jwk.JWK(kty="oct", k=b64url(digest))


def fail(reason):
    sys.exit("esprim_reference: " + reason)


def header_of(compact):
    return json.loads(unb64url(compact.split(".")[0]))


def with_header(compact, header):
    parts = compact.split(".")
    parts[0] = b64url(json_encode(header).encode())
    return ".".join(parts)


def flip_first(compact, index):
    parts = compact.split(".")
    parts[index] = ("B" if parts[index][0] == "A" else "A") + parts[index][1:]
    return ".".join(parts)


def open_object(request, pairwise):
    compact = request["jwe"]
    header = header_of(compact)
    for member, value in (("alg", "dir"), ("enc", "A256GCM"), ("cty", request["cty"])):
        if header.get(member) != value:
            fail("header %s is %r, not %r" % (member, header.get(member), value))
    for member, value in request.get("expect", {}).items():
        if header.get(member) != value:
            fail("header %s is %r, not %r" % (member, header.get(member), value))
    if "crit" in header or not isinstance(header.get("seq"), int) or not isinstance(header.get("kid"), str):
        fail("header members: crit present, or seq/kid of the wrong type")
    receiver = request["receiver_rand"]
    originator = header.get("oro", request.get("originator_rand"))
    if originator is None:
        fail("no oro in the header and none given")
    if header["rri"] != receiver["esri"] or header["ori"] != originator["esri"]:
        fail("rri/ori are not the esri of the receiver/originator rand objects")
    token = jwe.JWE()
    token.deserialize(compact, key=session_key(pairwise, receiver, originator))
    return {"header": header, "plaintext": token.payload.decode()}


def make_object(request, pairwise):
    receiver = request["receiver_rand"]
    originator = request.get("originator_rand") or {
        "esri": b64url(os.urandom(16)), "esrv": b64url(os.urandom(16)), "esrx": receiver["esrx"],
        "eska": [1], "espa": [12]}
    header = {"alg": "dir", "enc": "A256GCM", "kid": request["kid"], "cty": REQUEST, "ori": originator["esri"],
              "rri": receiver["esri"], "seq": request["seq"]}
    if request.get("oro", True):
        header["oro"] = originator
    token = jwe.JWE(request["plaintext"].encode(), protected=json_encode(header))
    token.add_recipient(session_key(pairwise, receiver, originator))
    compact = token.serialize(compact=True)
    tamper = request.get("tamper", "")
    if tamper == "header":
        header["seq"] = header["seq"] + 1
        compact = with_header(compact, header)
    elif tamper in ("kid", "ori", "rri"):
        header[tamper] = "ffeeddccbbaa99887766554433221100@mef.example.net" if tamper == "kid" else b64url(
            os.urandom(16))
        compact = with_header(compact, header)
    elif tamper in ("iv", "ciphertext", "tag"):
        compact = flip_first(compact, {"iv": 2, "ciphertext": 3, "tag": 4}[tamper])
    elif tamper:
        fail("unknown tamper " + tamper)
    return {"jwe": compact, "originator_rand": originator}


def main():
    request = json.load(sys.stdin)
    pairwise = bytes.fromhex(request["pairwise"])
    try:
        if request["op"] == "open":
            answer = open_object(request, pairwise)
        elif request["op"] == "make":
            answer = make_object(request, pairwise)
        else:
            fail("unknown op " + request["op"])
    except Exception as error:  # jwcrypto's refusals have several types; the test only needs "refused" and why
        fail("jwcrypto refused: %s: %s" % (type(error).__name__, error))
    print(json.dumps(answer))


main()
