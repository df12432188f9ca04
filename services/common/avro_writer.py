"""A compiled Avro binary writer for the hot schemas.

fastavro's generic writer spends most of an Event's encoding time working out which
branch of ``map<union{null, boolean, long, double, string}>`` each feature value takes.
Here a schema is compiled once into nested closures that dispatch on the exact Python
type, about twice as fast. The bytes are identical to fastavro's (the contract tests and a
property test compare them); anything outside the supported subset raises
``UnsupportedSchema`` and the codec keeps using fastavro.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

Writer = Callable[[Any, list[bytes]], None]

_PACK_DOUBLE = struct.Struct("<d").pack
_PACK_FLOAT = struct.Struct("<f").pack
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_SMALL = [bytes((((n << 1) ^ (n >> 63)) & 0xFF,)) for n in range(64)]
_SMALL_NEG = [bytes(((((-n) << 1) ^ ((-n) >> 63)) & 0xFF,)) for n in range(1, 65)]


class UnsupportedSchema(ValueError):
    pass


def zigzag(n: int) -> bytes:
    if 0 <= n < 64:
        return _SMALL[n]
    if -64 <= n < 0:
        return _SMALL_NEG[-n - 1]
    if not _LONG_MIN <= n <= _LONG_MAX:
        raise OverflowError(f"{n} does not fit an Avro long")
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _string(value: Any, out: list[bytes]) -> None:
    data = value.encode()
    out.append(zigzag(len(data)))
    out.append(data)


def _bytes(value: Any, out: list[bytes]) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    out.append(zigzag(len(value)))
    out.append(bytes(value))


def _long(value: Any, out: list[bytes]) -> None:
    if type(value) is bool or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    out.append(zigzag(value))


def _int(value: Any, out: list[bytes]) -> None:
    if type(value) is not int or not _INT_MIN <= value <= _INT_MAX:
        raise TypeError(f"expected a 32-bit integer, got {value!r}")
    out.append(zigzag(value))


def _double(value: Any, out: list[bytes]) -> None:
    out.append(_PACK_DOUBLE(value))


def _float(value: Any, out: list[bytes]) -> None:
    out.append(_PACK_FLOAT(value))


def _boolean(value: Any, out: list[bytes]) -> None:
    if type(value) is not bool:
        raise TypeError(f"expected a boolean, got {type(value).__name__}")
    out.append(b"\x01" if value else b"\x00")


def _null(value: Any, out: list[bytes]) -> None:
    if value is not None:
        raise TypeError(f"expected null, got {type(value).__name__}")


_PRIMITIVES: dict[str, Writer] = {
    "string": _string,
    "bytes": _bytes,
    "long": _long,
    "int": _int,
    "double": _double,
    "float": _float,
    "boolean": _boolean,
    "null": _null,
}
# Which branch of a union a Python value takes, by exact type (bool before int: bool is an int).
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


def _type_name(schema: Any) -> str:
    if isinstance(schema, str):
        return schema
    if isinstance(schema, dict):
        return str(schema["type"])
    return "union"


def compile_writer(schema: Any) -> Writer:
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return _PRIMITIVES[schema]
        raise UnsupportedSchema(f"named reference {schema!r}")
    if isinstance(schema, list):
        return _union(schema)
    kind = schema["type"]
    if kind == "record":
        return _record(schema)
    if kind == "map":
        return _map(compile_writer(schema["values"]))
    if kind == "array":
        return _array(compile_writer(schema["items"]))
    if kind == "enum":
        index = {s: i for i, s in enumerate(schema["symbols"])}
        return lambda value, out: out.append(zigzag(index[value]))
    if kind in _PRIMITIVES and not schema.get("logicalType"):
        return _PRIMITIVES[kind]
    raise UnsupportedSchema(f"type {kind!r}")


def _record(schema: dict[str, Any]) -> Writer:
    fields = []
    for f in schema["fields"]:
        has_default = "default" in f
        fields.append((f["name"], compile_writer(f["type"]), has_default, f.get("default")))

    def write(record: Any, out: list[bytes]) -> None:
        for name, writer, has_default, default in fields:
            writer(record.get(name, default) if has_default else record[name], out)

    return write


def _map(values: Writer) -> Writer:
    def write(value: Any, out: list[bytes]) -> None:
        if value:
            out.append(zigzag(len(value)))
            for key, item in value.items():
                _string(key, out)
                values(item, out)
        out.append(b"\x00")

    return write


def _array(items: Writer) -> Writer:
    def write(value: Any, out: list[bytes]) -> None:
        if value:
            out.append(zigzag(len(value)))
            for item in value:
                items(item, out)
        out.append(b"\x00")

    return write


def _union(branches: list[Any]) -> Writer:
    names = [_type_name(b) for b in branches]
    if any(n not in _BRANCH_TYPES for n in names):
        raise UnsupportedSchema(f"union of {names}")
    writers = [compile_writer(b) for b in branches]
    by_type: dict[type, tuple[bytes, Writer]] = {}
    for index, (name, writer) in enumerate(zip(names, writers, strict=True)):
        for py_type in _BRANCH_TYPES[name]:
            by_type.setdefault(py_type, (zigzag(index), writer))

    def write(value: Any, out: list[bytes]) -> None:
        branch = by_type.get(type(value))
        if branch is None:
            raise TypeError(f"{type(value).__name__} fits no branch of {names}")
        out.append(branch[0])
        branch[1](value, out)

    return write


def compile_encoder(schema: Any, header: bytes) -> Callable[[Any], bytes]:
    """``record -> header + body``; raises UnsupportedSchema at compile time if it cannot."""
    writer = compile_writer(schema)

    def encode(record: Any) -> bytes:
        out = [header]
        writer(record, out)
        return b"".join(out)

    return encode
