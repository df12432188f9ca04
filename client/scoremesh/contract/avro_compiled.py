"""Avro binary encoders and decoders compiled from a schema into Python source.

fastavro interprets the schema for every value it reads or writes; for an Event most of
that time goes to working out the branch of ``map<union{null, boolean, long, double,
string}>`` for each feature. Here a record schema is turned once into the source of one
straight-line function per direction (fields inlined, no call per value, map keys cached),
then compiled with ``exec``. The bytes and the decoded values are identical to fastavro's:
the contract tests compare both directions on generated records, and anything outside the
supported subset raises ``UnsupportedSchema`` so that the codec keeps using fastavro.

A decoded value is read from ``bytes`` at an offset; a body that ends early raises
``IndexError``/``struct.error`` or leaves the offset past the end, and a malformed one
raises ``ValueError``/``UnicodeDecodeError`` — the codec turns those into its typed errors.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

_PACK_DOUBLE = struct.Struct("<d").pack
_PACK_FLOAT = struct.Struct("<f").pack
_UNPACK_DOUBLE = struct.Struct("<d").unpack_from
_UNPACK_FLOAT = struct.Struct("<f").unpack_from
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_KEY_CACHE_MAX = 4096  # distinct map keys remembered per map field (feature names repeat)


class UnsupportedSchema(ValueError):
    pass


def _varint(z: int) -> bytes:
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


# Varints 14 bits at a time: the last group as it ends a number, and a middle group with
# its continuation bits set. A millisecond timestamp is then three lookups, not a loop.
_LAST14 = [_varint(z) for z in range(1 << 14)]
_MID14 = [bytes(((z & 0x7F) | 0x80, (z >> 7) | 0x80)) for z in range(1 << 14)]


def zigzag(n: int) -> bytes:
    """The Avro (zig-zag varint) encoding of a long."""
    if not _LONG_MIN <= n <= _LONG_MAX:
        raise OverflowError(f"{n} does not fit an Avro long")
    z = (n << 1) ^ (n >> 63)
    if z < 1 << 14:
        return _LAST14[z]
    if z < 1 << 28:
        return _MID14[z & 0x3FFF] + _LAST14[z >> 14]
    if z < 1 << 42:
        return _MID14[z & 0x3FFF] + _MID14[(z >> 14) & 0x3FFF] + _LAST14[z >> 28]
    return _varint(z)


# Lengths and small longs are looked up rather than computed.
_LEN = [zigzag(n) for n in range(16384)]
_SMALL = {n: zigzag(n) for n in range(-8192, 8192)}


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """A varint that did not fit one byte (the generated code inlines the one-byte case)."""
    shift = 0
    z = 0
    while True:
        b = data[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")
    if z >> 64:
        raise ValueError("varint does not fit a 64-bit long")
    return (z >> 1) ^ -(z & 1), pos


def _bad_type(expected: str, value: Any) -> TypeError:
    return TypeError(f"expected {expected}, got {type(value).__name__}")


def _bad_branch(value: Any, names: list[str]) -> TypeError:
    return TypeError(f"{type(value).__name__} fits no branch of {names}")


# A one-byte varint's long, looked up: most lengths, counts and union branches are one byte.
_ZIGZAG_BYTE = tuple((b >> 1) ^ -(b & 1) for b in range(128))

_NAMESPACE: dict[str, Any] = {
    "_ZZ": _ZIGZAG_BYTE,
    "_PD": _PACK_DOUBLE,
    "_PF": _PACK_FLOAT,
    "_UD": _UNPACK_DOUBLE,
    "_UF": _UNPACK_FLOAT,
    "_LEN": _LEN,
    "_SMALL": _SMALL,
    "_zz": zigzag,
    "_rl": _read_long,
    "_bad_type": _bad_type,
    "_bad_branch": _bad_branch,
    "_INT_MIN": _INT_MIN,
    "_INT_MAX": _INT_MAX,
    "_KEY_CACHE_MAX": _KEY_CACHE_MAX,
    "NoneType": type(None),
}
# Which branch of a union a Python value takes, by exact type (bool is not an int here).
_BRANCH_TYPES: dict[str, tuple[type, ...]] = {
    "null": (type(None),),
    "boolean": (bool,),
    "long": (int,),
    "int": (int,),
    "double": (float, int),
    "float": (float, int),
    "string": (str,),
    "bytes": (bytes,),
}
_TYPE_NAMES = {type(None): "NoneType", bool: "bool", int: "int", float: "float", str: "str"}
_TYPE_NAMES[bytes] = "bytes"
_PRIMITIVES = frozenset(_BRANCH_TYPES)


class _Source:
    """Lines of generated source with fresh local names and constants."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self._n = 0

    def var(self, stem: str) -> str:
        self._n += 1
        return f"_{stem}{self._n}"

    def const(self, value: Any, stem: str = "c") -> str:
        name = self.var(stem)
        self.consts[name] = value
        return name

    def emit(self, indent: int, line: str) -> None:
        self.lines.append("    " * indent + line)


def _kind(schema: Any) -> str:
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return schema
        raise UnsupportedSchema(f"named reference {schema!r}")
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        kind = schema.get("type")
        if isinstance(kind, str) and kind in _PRIMITIVES and not schema.get("logicalType"):
            return kind
        if kind in ("record", "map", "array", "enum"):
            return str(kind)
        raise UnsupportedSchema(f"type {kind!r}")
    raise UnsupportedSchema(f"schema {schema!r}")


# --- encoding ---------------------------------------------------------------------------


def _w_long(src: _Source, ind: int, v: str, *, checked: bool) -> None:
    if not checked:
        src.emit(
            ind, f"if {v}.__class__ is not int and (type({v}) is bool or not isinstance({v}, int)):"
        )
        src.emit(ind + 1, f"raise _bad_type('an integer', {v})")
    b = src.var("b")
    src.emit(ind, f"{b} = _SMALL.get({v})")
    src.emit(ind, f"ap({b} if {b} is not None else _zz({v}))")


def _w_string(src: _Source, ind: int, v: str) -> None:
    d = src.var("d")
    n = src.var("n")
    src.emit(ind, f"{d} = {v}.encode()")
    src.emit(ind, f"{n} = len({d})")
    src.emit(ind, f"ap(_LEN[{n}] if {n} < 16384 else _zz({n}))")
    src.emit(ind, f"ap({d})")


def _w_primitive(src: _Source, ind: int, kind: str, v: str, *, checked: bool = False) -> None:
    if kind == "string":
        _w_string(src, ind, v)
    elif kind == "long":
        _w_long(src, ind, v, checked=checked)
    elif kind == "int":
        src.emit(ind, f"if type({v}) is not int or not _INT_MIN <= {v} <= _INT_MAX:")
        src.emit(ind + 1, f"raise TypeError('expected a 32-bit integer, got ' + repr({v}))")
        _w_long(src, ind, v, checked=True)
    elif kind == "double":
        src.emit(ind, f"ap(_PD({v}))")
    elif kind == "float":
        src.emit(ind, f"ap(_PF({v}))")
    elif kind == "boolean":
        src.emit(ind, f"if {v} is True:")
        src.emit(ind + 1, "ap(b'\\x01')")
        src.emit(ind, f"elif {v} is False:")
        src.emit(ind + 1, "ap(b'\\x00')")
        src.emit(ind, "else:")
        src.emit(ind + 1, f"raise _bad_type('a boolean', {v})")
    elif kind == "null":
        src.emit(ind, f"if {v} is not None:")
        src.emit(ind + 1, f"raise _bad_type('null', {v})")
    elif kind == "bytes":
        src.emit(ind, f"if not isinstance({v}, (bytes, bytearray, memoryview)):")
        src.emit(ind + 1, f"raise _bad_type('bytes', {v})")
        d = src.var("d")
        src.emit(ind, f"{d} = bytes({v})")
        src.emit(ind, f"ap(_zz(len({d})))")
        src.emit(ind, f"ap({d})")
    else:  # pragma: no cover - _kind() admits only the kinds above
        raise UnsupportedSchema(kind)


def _w_union(src: _Source, ind: int, branches: list[Any], v: str) -> None:
    names = [_kind(b) for b in branches]
    if any(n not in _PRIMITIVES for n in names):
        raise UnsupportedSchema(f"union of {names}")
    by_type: dict[type, tuple[int, str]] = {}
    for index, name in enumerate(names):
        for py_type in _BRANCH_TYPES[name]:
            by_type.setdefault(py_type, (index, name))
    # Most likely first: feature values are mostly floats and ints.
    order = [t for t in (float, int, str, bool, type(None), bytes) if t in by_type]
    t = src.var("t")
    src.emit(ind, f"{t} = type({v})")
    for i, py_type in enumerate(order):
        index, name = by_type[py_type]
        src.emit(ind, f"{'if' if i == 0 else 'elif'} {t} is {_TYPE_NAMES[py_type]}:")
        src.emit(ind + 1, f"ap({zigzag(index)!r})")
        if name != "null":
            _w_primitive(src, ind + 1, name, v, checked=True)
    src.emit(ind, "else:")
    src.emit(ind + 1, f"raise _bad_branch({v}, {names!r})")


def _w_value(src: _Source, ind: int, schema: Any, v: str) -> None:
    kind = _kind(schema)
    if kind == "record":
        for field in schema["fields"]:
            fv = src.var("f")
            if "default" in field:
                src.emit(ind, f"{fv} = {v}.get({field['name']!r}, {src.const(field['default'])})")
            else:
                src.emit(ind, f"{fv} = {v}[{field['name']!r}]")
            _w_value(src, ind, field["type"], fv)
    elif kind == "map":
        cache = src.const({}, "keys")
        k, item, kb = src.var("k"), src.var("i"), src.var("kb")
        src.emit(ind, f"if {v}:")
        src.emit(ind + 1, f"ap(_LEN[len({v})] if len({v}) < 16384 else _zz(len({v})))")
        src.emit(ind + 1, f"for {k}, {item} in {v}.items():")
        src.emit(ind + 2, f"{kb} = {cache}.get({k})")
        src.emit(ind + 2, f"if {kb} is None:")
        d = src.var("d")
        src.emit(ind + 3, f"{d} = {k}.encode()")
        src.emit(ind + 3, f"{kb} = _zz(len({d})) + {d}")
        src.emit(ind + 3, f"if len({cache}) < _KEY_CACHE_MAX and type({k}) is str:")
        src.emit(ind + 4, f"{cache}[{k}] = {kb}")
        src.emit(ind + 2, f"ap({kb})")
        _w_value(src, ind + 2, schema["values"], item)
        src.emit(ind, "ap(b'\\x00')")
    elif kind == "array":
        item = src.var("i")
        src.emit(ind, f"if {v}:")
        src.emit(ind + 1, f"ap(_LEN[len({v})] if len({v}) < 16384 else _zz(len({v})))")
        src.emit(ind + 1, f"for {item} in {v}:")
        _w_value(src, ind + 2, schema["items"], item)
        src.emit(ind, "ap(b'\\x00')")
    elif kind == "enum":
        index = {s: zigzag(i) for i, s in enumerate(schema["symbols"])}
        src.emit(ind, f"ap({src.const(index, 'enum')}[{v}])")
    elif kind == "union":
        _w_union(src, ind, schema, v)
    else:
        _w_primitive(src, ind, kind, v)


def compile_encoder(schema: Any, header: bytes) -> Callable[[Any], bytes]:
    """``record -> header + body``; raises UnsupportedSchema at compile time if it cannot."""
    if _kind(schema) != "record":
        raise UnsupportedSchema("only records are compiled")
    src = _Source()
    src.emit(0, "def encode(record):")
    src.emit(1, "out = [_HEADER]")
    src.emit(1, "ap = out.append")
    _w_value(src, 1, schema, "record")
    src.emit(1, "return b''.join(out)")
    encode: Callable[[Any], bytes] = _build(src, "encode", {"_HEADER": header}, schema)
    return encode


# --- decoding ---------------------------------------------------------------------------


def _r_long(src: _Source, ind: int, target: str) -> None:
    b = src.var("b")
    src.emit(ind, f"{b} = data[pos]")
    src.emit(ind, "pos += 1")
    src.emit(ind, f"if {b} < 128:")
    src.emit(ind + 1, f"{target} = _ZZ[{b}]")
    src.emit(ind, "else:")
    src.emit(ind + 1, f"{target}, pos = _rl(data, pos - 1)")


def _r_string(src: _Source, ind: int, target: str, *, text: bool = True) -> None:
    n = src.var("n")
    _r_long(src, ind, n)
    src.emit(ind, f"if {n} < 0:")
    src.emit(ind + 1, f"raise ValueError('negative length ' + str({n}))")
    end = src.var("e")
    src.emit(ind, f"{end} = pos + {n}")
    src.emit(ind, f"if {end} > size:")
    src.emit(ind + 1, "raise IndexError('body ends inside a string')")
    if text:
        value = f"data[pos:{end}].decode()"
        src.emit(ind, f"{target} = {value}" if target else value)  # no target: checked, dropped
    elif target:
        src.emit(ind, f"{target} = data[pos:{end}]")
    src.emit(ind, f"pos = {end}")


def _r_primitive(src: _Source, ind: int, kind: str, target: str) -> None:
    if kind == "string":
        _r_string(src, ind, target)
    elif kind == "bytes":
        _r_string(src, ind, target, text=False)
    elif kind in ("long", "int"):
        _r_long(src, ind, target)
    elif kind == "double":
        src.emit(ind, f"{target} = _UD(data, pos)[0]")
        src.emit(ind, "pos += 8")
    elif kind == "float":
        src.emit(ind, f"{target} = _UF(data, pos)[0]")
        src.emit(ind, "pos += 4")
    elif kind == "boolean":
        b = src.var("b")
        src.emit(ind, f"{b} = data[pos]")
        src.emit(ind, "pos += 1")
        src.emit(ind, f"if {b} > 1:")
        src.emit(ind + 1, f"raise ValueError('boolean byte ' + str({b}))")
        src.emit(ind, f"{target} = {b} == 1")
    elif kind == "null":
        src.emit(ind, f"{target} = None")
    else:  # pragma: no cover
        raise UnsupportedSchema(kind)


def _r_block_count(src: _Source, ind: int, count: str) -> None:
    """A block's item count; a negative count is followed by the block's size in bytes."""
    _r_long(src, ind, count)
    src.emit(ind, f"if {count} < 0:")
    src.emit(ind + 1, f"{count} = -{count}")
    _r_long(src, ind + 1, src.var("skip"))


def _r_union_index(src: _Source, ind: int, schema: list[Any]) -> tuple[list[str], str]:
    """A union's branch kinds (primitives only), and the variable its branch index is read
    into."""
    names = [_kind(b) for b in schema]
    if any(n not in _PRIMITIVES for n in names):
        raise UnsupportedSchema(f"union of {names}")
    index = src.var("x")
    _r_long(src, ind, index)
    return names, index


def _s_value(src: _Source, ind: int, schema: Any) -> None:
    """Read past a value without building it, checking it as ``_r_value`` would (lengths,
    branches, booleans, UTF-8), so a body that one rejects the other rejects too."""
    kind = _kind(schema)
    if kind == "record":
        for field in schema["fields"]:
            _s_value(src, ind, field["type"])
    elif kind in ("map", "array"):
        count = src.var("cnt")
        _r_block_count(src, ind, count)
        src.emit(ind, f"while {count}:")
        src.emit(ind + 1, f"for _ in range({count}):")
        if kind == "map":
            _r_string(src, ind + 2, "")
        _s_value(src, ind + 2, schema["values" if kind == "map" else "items"])
        _r_block_count(src, ind + 1, count)
    elif kind == "union":
        names, index = _r_union_index(src, ind, schema)
        src.emit(ind, f"if not 0 <= {index} < {len(names)}:")
        src.emit(ind + 1, f"raise ValueError('union branch ' + str({index}) + ' of {len(names)}')")
        for position, i in enumerate([i for i, n in enumerate(names) if n != "null"]):
            src.emit(ind, f"{'if' if position == 0 else 'elif'} {index} == {i}:")
            _s_value(src, ind + 1, names[i])
    elif kind in ("double", "float"):
        src.emit(ind, f"pos += {8 if kind == 'double' else 4}")
    elif kind == "bytes":
        _r_string(src, ind, "", text=False)
    elif kind != "null":  # strings are decoded (and dropped) to check them; the rest is read
        _r_value(src, ind, schema, "" if kind == "string" else src.var("skip"))


def _r_value(
    src: _Source,
    ind: int,
    schema: Any,
    target: str,
    marks: dict[str, str] | None = None,
    skip: frozenset[str] = frozenset(),
) -> None:
    kind = _kind(schema)
    if kind == "record":
        values = []
        for field in schema["fields"]:
            if field["name"] in skip:
                _s_value(src, ind, field["type"])
            else:
                fv = src.var("f")
                _r_value(src, ind, field["type"], fv)
                values.append(f"{field['name']!r}: {fv}")
            if marks is not None and field["name"] in marks:
                src.emit(ind, f"{marks[field['name']]} = pos")
        src.emit(ind, f"{target} = {{{', '.join(values)}}}")
    elif kind in ("map", "array"):
        count, item = src.var("cnt"), src.var("i")
        src.emit(ind, f"{target} = {{}}" if kind == "map" else f"{target} = []")
        _r_block_count(src, ind, count)
        src.emit(ind, f"while {count}:")
        src.emit(ind + 1, f"for _ in range({count}):")
        if kind == "map":
            k = src.var("k")
            _r_string(src, ind + 2, k)
            _r_value(src, ind + 2, schema["values"], item)
            src.emit(ind + 2, f"{target}[{k}] = {item}")
        else:
            _r_value(src, ind + 2, schema["items"], item)
            src.emit(ind + 2, f"{target}.append({item})")
        _r_block_count(src, ind + 1, count)
    elif kind == "enum":
        symbols = src.const(tuple(schema["symbols"]), "sym")
        index = src.var("x")
        _r_long(src, ind, index)
        src.emit(ind, f"if not 0 <= {index} < {len(schema['symbols'])}:")
        src.emit(ind + 1, f"raise ValueError('enum index ' + str({index}))")
        src.emit(ind, f"{target} = {symbols}[{index}]")
    elif kind == "union":
        names, index = _r_union_index(src, ind, schema)
        # Most likely branches first (doubles and longs for feature maps).
        likely = {"double": 0, "long": 1}
        order = sorted(range(len(names)), key=lambda i: likely.get(names[i], 2))
        for position, i in enumerate(order):
            src.emit(ind, f"{'if' if position == 0 else 'elif'} {index} == {i}:")
            _r_primitive(src, ind + 1, names[i], target)
        src.emit(ind, "else:")
        src.emit(ind + 1, f"raise ValueError('union branch ' + str({index}) + ' of {len(names)}')")
    else:
        _r_primitive(src, ind, kind, target)


def compile_decoder(schema: Any) -> Callable[[bytes, int], dict[str, Any]]:
    """``(data, offset) -> record``, reading the body that starts at ``offset``."""
    decode: Callable[[bytes, int], dict[str, Any]] = _compile_reader(schema, None)
    return decode


def compile_marking_decoder(
    schema: Any, after: tuple[str, ...], skip: tuple[str, ...] = ()
) -> Callable[[bytes, int], tuple[dict[str, Any], tuple[int, ...]]]:
    """``(data, offset) -> (record, positions)``: as ``compile_decoder``, plus the offset in
    ``data`` just after each named top-level field, in the order of ``after``. Lets a reader
    reuse a run of fields as bytes (the label join copies an event's fields into its outputs).
    Top-level fields named in ``skip`` are read past and checked but left out of the record:
    a reader that keeps them only as bytes does not pay for building them.
    """
    decode: Callable[[bytes, int], tuple[dict[str, Any], tuple[int, ...]]] = _compile_reader(
        schema, after, skip
    )
    return decode


def _compile_reader(schema: Any, after: tuple[str, ...] | None, skip: tuple[str, ...] = ()) -> Any:
    if _kind(schema) != "record":
        raise UnsupportedSchema("only records are compiled")
    names = [field["name"] for field in schema["fields"]]
    marks: dict[str, str] | None = None
    if after is not None:
        missing = [name for name in after if name not in names]
        if missing:
            raise UnsupportedSchema(f"no top-level field {missing[0]!r} to mark")
        marks = {name: f"_at{i}" for i, name in enumerate(after)}
    unknown = [name for name in skip if name not in names]
    if unknown:
        raise UnsupportedSchema(f"no top-level field {unknown[0]!r} to skip")
    src = _Source()
    src.emit(0, "def decode(data, pos):")
    src.emit(1, "size = len(data)")
    _r_value(src, 1, schema, "record", marks, frozenset(skip))
    src.emit(1, "if pos > size:")
    src.emit(2, "raise IndexError('body ends early')")
    if marks is None:
        src.emit(1, "return record")
    else:
        src.emit(1, f"return record, ({''.join(f'{marks[n]}, ' for n in marks)})")
    return _build(src, "decode", {}, schema)


def _build(src: _Source, name: str, extra: dict[str, Any], schema: Any) -> Any:
    namespace = {**_NAMESPACE, **src.consts, **extra}
    code = compile("\n".join(src.lines), f"<avro {name} {schema.get('name', '?')}>", "exec")
    exec(code, namespace)  # noqa: S102 - source generated above from a schema, no user input
    return namespace[name]
