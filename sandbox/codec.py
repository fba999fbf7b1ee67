"""Tagged plain-data codec between the sandbox and the trusted process (standard library only).

A value is turned into JSON with a few one-key tag objects for what JSON cannot hold, so that the
trusted side rebuilds it with ``json.loads`` and these rules only (no eval, no pickle):

- ``None``, ``bool``, ``str``, ``float`` (finite) and ``int`` (|x| < 2**63) are plain JSON;
- ``list`` is a JSON array; ``{"t": [...]}`` tuple; ``{"s": [...]}`` set; ``{"fs": [...]}`` frozenset;
  ``{"d": [[k, v], ...]}`` dict (keys of any hashable plain type); ``{"f": "nan" | "inf" | "-inf"}``;
  ``{"b": "<base64>"}`` bytes; ``{"i": "<hex>"}`` an int beyond 64 bits (hex: no digit-count limit).

Encoding accepts EXACT builtin types only (``type(x) is int``): a subclass or an object with its own
``__eq__`` cannot pass for an answer. Depth and node count are bounded on both sides. Decoding, in the
trusted process, also bounds its time: a set, frozenset or dict whose elements share hash values (integers
that differ by multiples of 2**61 - 1 all hash alike, and so do tuples of them) would make its hash table
quadratic to build, so one whose collisions would cost more than ``MAX_COLLISION_WORK`` probes beyond the
usual is refused before it is built (a real set or dict of distinct values is nowhere near), and the whole
decoding stops after ``MAX_DECODE_SECONDS``.

This file runs inside the sandbox too (``sandbox/pool.py:worker_source``): keep it stdlib-only.
"""

import base64
import json
import math
import time

MAX_DEPTH = 100
MAX_NODES = 1_000_000
MAX_ENCODED_BYTES = 16 << 20
MAX_COLLISION_WORK = 1 << 16
MAX_DECODE_SECONDS = 2.0
_SMALL_INT = 1 << 63


class PlainDataError(ValueError):
    """The value is not plain data (or is too deep / too large)."""


def encode_value(value):
    """Return the JSON text of ``value``; raise PlainDataError for anything but exact plain types."""
    budget = [MAX_NODES]

    def enc(x, depth):
        budget[0] -= 1
        if budget[0] < 0:
            raise PlainDataError("value has more than %d elements" % MAX_NODES)
        if depth > MAX_DEPTH:
            raise PlainDataError("value is nested deeper than %d levels" % MAX_DEPTH)
        t = type(x)
        if x is None or t is bool or t is str:
            return x
        if t is int:
            if -_SMALL_INT < x < _SMALL_INT:
                return x
            return {"i": hex(x)}
        if t is float:
            if math.isnan(x):
                return {"f": "nan"}
            if math.isinf(x):
                return {"f": "inf" if x > 0 else "-inf"}
            return x
        if t is list:
            return [enc(v, depth + 1) for v in x]
        if t is tuple:
            return {"t": [enc(v, depth + 1) for v in x]}
        if t is set:
            return {"s": [enc(v, depth + 1) for v in x]}
        if t is frozenset:
            return {"fs": [enc(v, depth + 1) for v in x]}
        if t is dict:
            return {"d": [[enc(k, depth + 1), enc(v, depth + 1)] for k, v in x.items()]}
        if t is bytes:
            return {"b": base64.b64encode(x).decode("ascii")}
        raise PlainDataError("returned a %s object, not plain data" % _type_name(t))

    text = json.dumps(enc(value, 0), allow_nan=False, separators=(",", ":"))
    if len(text) > MAX_ENCODED_BYTES:
        raise PlainDataError("value is larger than %d bytes once encoded" % MAX_ENCODED_BYTES)
    return text


def _type_name(t):
    name = type.__dict__["__name__"].__get__(t)  # bypasses a metaclass that overrides __name__
    module = type.__dict__["__module__"].__get__(t)
    return name if module in ("builtins", "__main__", None) else "%s.%s" % (module, name)


def decode_value(text):
    """Rebuild a value from ``encode_value``'s text; raise PlainDataError on anything malformed."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "strict")
    if len(text) > MAX_ENCODED_BYTES:
        raise PlainDataError("encoded value is too large")
    try:
        raw = json.loads(text, parse_constant=_reject_constant)
    except (RecursionError, ValueError) as e:
        raise PlainDataError("malformed encoded value: %s" % e) from None
    budget = [MAX_NODES]
    deadline = time.monotonic() + MAX_DECODE_SECONDS

    def dec(x, depth):
        budget[0] -= 1
        if budget[0] < 0 or depth > MAX_DEPTH + 1:
            raise PlainDataError("encoded value is too deep or too large")
        if not budget[0] & 0x3FFF and time.monotonic() > deadline:
            raise PlainDataError("encoded value takes too long to decode")
        t = type(x)
        if x is None or t is bool or t is str or t is float:
            return x
        if t is int:
            if not -_SMALL_INT < x < _SMALL_INT:
                raise PlainDataError("untagged big int")
            return x
        if t is list:
            return [dec(v, depth + 1) for v in x]
        if t is not dict or len(x) != 1:
            raise PlainDataError("malformed tag object")
        ((tag, body),) = x.items()
        if tag == "t" and type(body) is list:
            return tuple(dec(v, depth + 1) for v in body)
        if tag in ("s", "fs") and type(body) is list:
            items = [dec(v, depth + 1) for v in body]
            _spread_hashes(items, "set element")
            return set(items) if tag == "s" else frozenset(items)
        if tag == "d" and type(body) is list:
            if not all(type(pair) is list and len(pair) == 2 for pair in body):
                raise PlainDataError("malformed dict item")
            keys = [dec(pair[0], depth + 1) for pair in body]
            _spread_hashes(keys, "dict key")
            return dict(zip(keys, [dec(pair[1], depth + 1) for pair in body]))
        if tag == "f" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "b" and type(body) is str:
            try:
                return base64.b64decode(body.encode("ascii"), validate=True)
            except ValueError as e:
                raise PlainDataError("bad bytes: %s" % e) from None
        if tag == "i" and type(body) is str and len(body) < 1 << 20:
            try:
                return int(body, 16)
            except ValueError:
                raise PlainDataError("bad big int") from None
        raise PlainDataError("unknown tag %r" % (tag,))

    return dec(raw, 0)


def _spread_hashes(items, what):
    """Refuse elements of a set or keys of a dict whose shared hash values would make the hash table slow to
    build (each element probes past every earlier one of its hash: sum of squared group sizes)."""
    counts = {}  # keyed by hash values: distinct ints hash apart (as themselves), so this table stays fast
    try:
        for item in items:
            h = hash(item)
            counts[h] = counts.get(h, 0) + 1
    except TypeError as e:  # an unhashable element
        raise PlainDataError("bad %s: %s" % (what, e)) from None
    work = sum(n * n for n in counts.values()) - len(items)
    if work > MAX_COLLISION_WORK:
        raise PlainDataError("too many %ss share a hash value (%d elements, %d distinct hashes)"
                             % (what, len(items), len(counts)))


def _reject_constant(name):
    raise PlainDataError("bare %s in encoded value" % name)
