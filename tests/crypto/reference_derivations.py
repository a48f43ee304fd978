#!/usr/bin/env python3
"""Independent reference for dauth's key derivations, written from docs/PROTOCOL.md and RFC 5869 with Python's hmac and
hashlib only (no code shared with the C++). Reads one JSON object per line on stdin, writes one hex result per line.

ops:
  {"op": "hmac", "key": hex, "msg": hex}
  {"op": "hkdf", "ikm": hex, "salt": hex, "info": hex, "length": n}
  {"op": "bootstrap", "export": hex(48 bytes), "fqdn": str}         -> "<KeID> <Ke hex>"
  {"op": "ker", "ke": hex}                                            (PROTOCOL.md §3.5)
  {"op": "usage", "ke": hex, "suid": n, "target": str}                (TS-0003 §10.3.7, PROTOCOL.md §4)
"""
import hashlib
import hmac
import json
import sys

KER_LABEL = b"dauth Enrolment Re-authentication Key derivation"
USAGE_LABEL = b"oneM2M Enrolment Key to Usage-Constrained Symmetric Key derivation"


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt if salt else b"\x00" * 32, ikm, hashlib.sha256).digest()  # RFC 5869 §2.2
    okm, block, counter = b"", b"", 1
    while len(okm) < length:  # RFC 5869 §2.3
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def main() -> None:
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "hmac":
            out = hmac.new(bytes.fromhex(req["key"]), bytes.fromhex(req["msg"]), hashlib.sha256).hexdigest()
        elif op == "hkdf":
            out = hkdf(bytes.fromhex(req["ikm"]), bytes.fromhex(req["salt"]), bytes.fromhex(req["info"]),
                       req["length"]).hex()
        elif op == "bootstrap":
            exported = bytes.fromhex(req["export"])
            assert len(exported) == 48
            ke_id = exported[:16].hex().upper() + "@" + req["fqdn"].lower()
            out = ke_id + " " + exported[16:].hex()
        elif op == "ker":
            out = hmac.new(bytes.fromhex(req["ke"]), KER_LABEL, hashlib.sha256).hexdigest()
        elif op == "usage":
            msg = USAGE_LABEL + str(req["suid"]).encode("ascii") + req["target"].encode("utf-8")
            out = hmac.new(bytes.fromhex(req["ke"]), msg, hashlib.sha256).hexdigest()
        else:
            raise SystemExit("unknown op " + op)
        print(out)


if __name__ == "__main__":
    main()
