"""Avro single-object encoding (``C3 01`` + CRC-64-AVRO fingerprint + body).

Every released schema version lives in ``schemas/avro/<Name>.v<N>.avsc``. The newest
version is the writer; every version's fingerprint is known to the reader, and old
bodies are resolved into the newest schema, so a rolling upgrade never meets an
unknown fingerprint. Schemas are parsed once per process.
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, Generic, TypeVar, overload

import orjson
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from scoremesh.contract.avro_compiled import (
    UnsupportedSchema,
    compile_decoder,
    compile_encoder,
    compile_marking_decoder,
)
from scoremesh.contract.catalog import schemas_dir, topic_spec

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
_T = TypeVar("_T")
R = TypeVar("R")  # a record type of scoremesh.contract.records (a TypedDict)
_FILE_RE = re.compile(r"^(?P<name>[A-Za-z]+)\.v(?P<version>\d+)\.avsc$")


class CodecError(ValueError):
    """A value could not be decoded or encoded. ``code`` is a machine-readable reason."""

    code = "undecodable"


class NotSingleObject(CodecError):
    code = "not_avro"


class UnknownFingerprint(CodecError):
    code = "unknown_schema"


class TruncatedMessage(CodecError):
    code = "truncated"


class BadBody(CodecError):
    code = "undecodable"


class EncodeError(CodecError):
    code = "encode_error"


@dataclass(frozen=True)
class SchemaVersion:
    name: str
    version: int
    parsed: dict[str, Any]
    fingerprint: bytes  # 8 bytes, little-endian as on the wire
    raw: dict[str, Any]  # the .avsc as written, for the compiled writer


def _fingerprint(parsed: dict[str, Any]) -> bytes:
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))


@lru_cache(maxsize=1)
def all_schema_versions() -> dict[str, list[SchemaVersion]]:
    found: dict[str, list[SchemaVersion]] = {}
    for path in sorted((schemas_dir() / "avro").glob("*.avsc")):
        match = _FILE_RE.match(path.name)
        if not match:
            raise CodecError(f"{path.name}: schema files are named <Name>.v<N>.avsc")
        raw = json.loads(path.read_text())
        # The fingerprint comes from the plain parse; encoding and decoding use the default
        # parse, whose write hint spares fastavro a re-parse on every call (~35% faster).
        plain = parse_schema(raw, _write_hint=False)
        parsed = parse_schema(raw)
        if not isinstance(parsed, dict) or not isinstance(plain, dict):
            raise CodecError(f"{path.name}: a top-level schema must be a record")
        found.setdefault(match["name"], []).append(
            SchemaVersion(match["name"], int(match["version"]), parsed, _fingerprint(plain), raw)
        )
    for versions in found.values():
        versions.sort(key=lambda v: v.version)
    return found


class AvroCodec(Generic[R]):
    """Encoder/decoder for one record type; decodes every released version of it.

    Typed by the record's TypedDict when made with ``codec(records.Event)``, so mypy checks
    the field names and types of what is encoded and decoded."""

    def __init__(self, name: str) -> None:
        versions = all_schema_versions().get(name)
        if not versions:
            raise CodecError(f"no schema named {name!r} in {schemas_dir() / 'avro'}")
        self.name = name
        self.current = versions[-1]
        self._header = MAGIC + self.current.fingerprint
        self._writers = {v.fingerprint: v.parsed for v in versions}
        try:
            self._fast: Callable[[Any], bytes] | None = compile_encoder(
                self.current.raw, self._header
            )
        except UnsupportedSchema:
            self._fast = None
        try:
            self._fast_decode: Callable[[bytes, int], dict[str, Any]] | None = compile_decoder(
                self.current.raw
            )
        except UnsupportedSchema:
            self._fast_decode = None
        self._marking: dict[
            tuple[tuple[str, ...], tuple[str, ...]],
            Callable[[bytes, int], tuple[dict[str, Any], tuple[int, ...]]] | None,
        ] = {}

    def encode(self, record: R) -> bytes:
        try:
            if self._fast is not None:
                return self._fast(record)
            buf = io.BytesIO()
            buf.write(self._header)
            schemaless_writer(buf, self.current.parsed, record)
            return buf.getvalue()
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise EncodeError(f"{self.name}: cannot encode record: {exc!r}") from exc

    @property
    def header(self) -> bytes:
        """``C3 01`` + the current schema's fingerprint: what every encoded record starts with."""
        return self._header

    def decode(self, data: bytes) -> R:
        writer = self._writer(data)
        if writer is self.current.parsed and self._fast_decode is not None:
            return self._compiled(self._fast_decode, data)  # type: ignore[return-value]
        return self._resolve(writer, data)  # type: ignore[return-value]

    def decode_marking(
        self, data: bytes, after: tuple[str, ...], skip: tuple[str, ...] = ()
    ) -> tuple[dict[str, Any], tuple[int, ...] | None]:
        """``decode``, plus the offset in ``data`` just after each named top-level field, when
        the data was written with the current schema (None for an older writer, whose fields
        lie elsewhere). Fields in ``skip`` are checked but left out of the record when the
        marks are given (an older writer's record has them all). The compiled reader of each
        (after, skip) is made once."""
        writer = self._writer(data)
        if writer is self.current.parsed:
            marking = self._marking.get((after, skip))
            if marking is None and (after, skip) not in self._marking:
                try:
                    marking = compile_marking_decoder(self.current.raw, after, skip)
                except UnsupportedSchema:
                    marking = None
                self._marking[(after, skip)] = marking
            if marking is not None:
                return self._compiled(marking, data)
        return self._resolve(writer, data), None

    def _writer(self, data: bytes) -> dict[str, Any]:
        if data[:2] != MAGIC:
            raise NotSingleObject(f"{self.name}: not Avro single-object encoded (no C3 01 header)")
        if len(data) < HEADER_LEN:
            raise TruncatedMessage(f"{self.name}: header ends early ({len(data)} bytes)")
        fp = data[2:HEADER_LEN]
        writer = self._writers.get(fp)
        if writer is None:
            raise UnknownFingerprint(
                f"{self.name}: unknown schema fingerprint {fp.hex()}; "
                "the producer uses a schema this reader was never given"
            )
        return writer

    def _compiled(self, reader: Callable[[bytes, int], _T], data: bytes) -> _T:
        try:
            return reader(data if type(data) is bytes else bytes(data), HEADER_LEN)
        except (IndexError, struct.error) as exc:
            raise TruncatedMessage(f"{self.name}: body ends early ({len(data)} bytes)") from exc
        except (ValueError, TypeError, OverflowError) as exc:
            raise BadBody(f"{self.name}: body does not match the schema: {exc}") from exc

    def _resolve(self, writer: dict[str, Any], data: bytes) -> dict[str, Any]:
        reader = None if writer is self.current.parsed else self.current.parsed
        try:
            record = schemaless_reader(io.BytesIO(memoryview(data)[HEADER_LEN:]), writer, reader)
        except EOFError as exc:
            raise TruncatedMessage(f"{self.name}: body ends early ({len(data)} bytes)") from exc
        except (ValueError, TypeError, IndexError, UnicodeDecodeError, OverflowError) as exc:
            raise BadBody(f"{self.name}: body does not match the schema: {exc}") from exc
        if not isinstance(record, dict):
            raise BadBody(f"{self.name}: body is not a record")
        return record


@cache
def _shared(name: str) -> AvroCodec[Any]:
    return AvroCodec(name)


@overload
def codec(record: type[R]) -> AvroCodec[R]: ...
@overload
def codec(record: str) -> AvroCodec[dict[str, Any]]: ...
def codec(record: type[Any] | str) -> AvroCodec[Any]:
    """The shared codec for a record type, parsed once per process: ``codec(Event)`` with a
    TypedDict of ``scoremesh.contract.records`` (typed), or ``codec("Event")`` by name."""
    return _shared(record if isinstance(record, str) else record.__name__)


def codec_for_topic(topic: str) -> AvroCodec[dict[str, Any]]:
    return codec(topic_spec(topic).value)


def decode_any(topic: str, data: bytes) -> dict[str, Any]:
    """Decode a catalog topic's value: Avro single-object, or JSON where the topic allows it."""
    if data[:2] == MAGIC:
        return codec_for_topic(topic).decode(data)
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadBody(f"{topic}: neither Avro single-object nor JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadBody(f"{topic}: JSON value is a {type(value).__name__}, not an object")
    return value
