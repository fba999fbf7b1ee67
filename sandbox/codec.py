"""Tagged plain-data codec between the sandbox and the trusted process (standard library only).

A value is turned into JSON with a few one-key tag objects for what JSON cannot hold, so that the
trusted side rebuilds it with ``json.loads`` and these rules only (no eval, no pickle):

- ``None``, ``bool``, ``str``, ``float`` (finite) and ``int`` (|x| < 2**63) are plain JSON;
- ``list`` is a JSON array; ``{"t": [...]}`` tuple; ``{"s": [...]}`` set; ``{"fs": [...]}`` frozenset;
  ``{"d": [[k, v], ...]}`` dict (keys of any hashable plain type); ``{"f": "nan" | "inf" | "-inf"}``;
  ``{"b": "<base64>"}`` bytes; ``{"i": "<hex>"}`` an int beyond 64 bits (hex: no digit-count limit).

Encoding accepts EXACT builtin types only (``type(x) is int``): a subclass or an object with its own
``__eq__`` cannot pass for an answer. Depth and node count are bounded on both sides.

Decoding, in the trusted process, is bounded by construction, whatever the value's shape. Its only work
beyond linear is in building hash tables (sets, frozensets, dict keys): an element is compared with ``==``
only to earlier elements of the same hash value, and such collisions are cheap to make (integers that differ
by multiples of 2**61 - 1 all hash alike, and so do tuples and frozensets of them), each comparison costing up
to the elements' own size and, inside nested frozensets, their own collisions. Before a table is built its
elements are grouped by hash value (the hash values themselves, distinct integers below 2**61, never
collide) and the comparisons it may cost are bounded from above (``_collision_cost``); a value whose tables
may cost more than ``MAX_COLLISION_WORK`` element comparisons in all is refused before that table is built
(a real set or dict of distinct values costs none). ``MAX_DECODE_SECONDS`` is a backstop between nodes.

This file runs inside the sandbox too (``sandbox/pool.py:worker_source``): keep it stdlib-only.
"""

import base64
import json
import math
import time

MAX_DEPTH = 100
MAX_NODES = 1_000_000
MAX_ENCODED_BYTES = 16 << 20
MAX_COLLISION_WORK = 1 << 22  # element comparisons (~13 ns each here: ~55 ms)
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

    text = _ENCODER.encode(enc(value, 0))
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
        raw = _DECODER.decode(text)
    except (RecursionError, ValueError) as e:
        raise PlainDataError("malformed encoded value: %s" % e) from None
    budget = [MAX_NODES]
    deadline = time.monotonic() + MAX_DECODE_SECONDS
    shapes = {}  # id of a decoded frozenset -> its shape (``_shape``)
    work = [MAX_COLLISION_WORK]

    def table(items, what):
        """Charge the comparisons that building a hash table of ``items`` may cost, before it is built."""
        cost, widest = _collision_cost(items, shapes, what)
        work[0] -= cost
        if work[0] < 0:
            raise PlainDataError("too many %ss share a hash value (building the value would take %.3g comparisons)"
                                 % (what, MAX_COLLISION_WORK - work[0]))
        return widest

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
            widest = table(items, "set element")
            if tag == "s":
                return set(items)
            value = frozenset(items)
            size, depth_, wide = _shape(tuple(items), shapes)
            # (holding the value: no id is reused meanwhile)
            shapes[id(value)] = (size, depth_ + 1, max(wide, widest), value)
            return value
        if tag == "d" and type(body) is list:
            if not all(type(pair) is list and len(pair) == 2 for pair in body):
                raise PlainDataError("malformed dict item")
            keys = [dec(pair[0], depth + 1) for pair in body]
            table(keys, "dict key")
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


def _shape(x, shapes):
    """What bounds the cost of comparing a hashable decoded value with another of the same hash value:
    (size: its nodes, long strings and ints weighing more; depth: frozensets nested in it, itself included;
    widest: the most elements of one hash value in any frozenset in it). A frozenset's is noted in ``shapes``
    when it is built; a tuple's is read through when needed (only for an element that shares its hash value:
    each node is read for the nearest table above it only)."""
    t = type(x)
    if t is frozenset:
        return shapes[id(x)][:3]
    if t is tuple:
        size, depth, widest = 1, 0, 1
        for v in x:
            s, d, w = _shape(v, shapes)
            size, depth, widest = size + s, max(depth, d), max(widest, w)
        return size, depth, widest
    if t is str or t is bytes:
        return 1 + len(x) // 64, 0, 1
    if t is int:
        return 1 + x.bit_length() // 4096, 0, 1
    return 1, 0, 1


def _collision_cost(items, shapes, what):
    """(an upper bound on the element comparisons that building a hash table of ``items`` costs, the largest
    number of them sharing one hash value). Hashing is linear (a tuple's hash is not cached, but each node is
    hashed for the nearest table above it only: a frozenset's hash is cached).

    Inserting an element compares it with the earlier ones of its hash value: a group of g costs at most
    (g - 1) times the sum of its members' comparison costs. Comparing two values of one hash value x and y
    costs at most F(x) + F(y), with F = G ** depth * size and G the largest group in either (by induction:
    tuples compare item by item; a frozenset looks each element up among the other's elements of its hash
    value, at most G of them, after comparing lengths and cached hashes)."""
    try:
        hashes = [hash(item) for item in items]
    except TypeError as e:  # an unhashable element
        raise PlainDataError("bad %s: %s" % (what, e)) from None
    if len(set(hashes)) == len(hashes):  # (hash values are distinct integers below 2**61: they hash apart)
        return 0.0, 1
    groups = {}  # hash value -> members
    for h, item in zip(hashes, items):
        group = groups.get(h)
        if group is None:
            groups[h] = [item]
        else:
            group.append(item)
    cost, widest = 0.0, 1
    for group in groups.values():
        if len(group) < 2:
            continue
        widest = max(widest, len(group))
        parts = [_shape(v, shapes) for v in group]
        g = float(max(w for _, _, w in parts))
        cost += (len(group) - 1) * sum(g ** depth * size for size, depth, _ in parts)
    return cost, widest


def _reject_constant(name):
    raise PlainDataError("bare %s in encoded value" % name)


# Made once (json.dumps and json.loads with options build a new one per call): a call's process in a session
# encodes and decodes with what it inherits, touching fewer of its parent's pages (each a copy-on-write fault).
_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
