"""Audio uploads: a multipart/form-data body streamed on to the model server, never held whole in memory.

The gateway reads only the text fields it needs (`FIELDS_READ`) as the form goes by, with python-multipart's
streaming parser (Starlette's, so vLLM's). Clients put the text fields before the file (the OpenAI client,
httpx and requests do), so the parse stage has them once the file begins, and the file streams on to the
model server as it arrives. A form whose `model` is not before the file is spooled to a temporary file until
its end (in memory up to `SPOOL_MEMORY_BYTES`), then read from there. Once the gateway has read `model`
before the file, a field it reads that comes after the file is refused (400 `form_field_after_file`): the
request was routed without it. A body that is not a readable multipart form goes on unchanged, for the model
server to judge; the gateway then finds no `model` in it.

Fields the gateway adds (the model it chose, the stream's usage options) go in as parts just before the
form's closing delimiter: vLLM, like Starlette, takes a repeated field's last value.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import IO

from django.conf import settings
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import parse_options_header

from resource_server.errors import ErrorCode, InvalidRequest, UpstreamError
from resource_server.pipeline.parse import ParsedRequest, lax_bool, lax_int
from resource_server.routes import RouteDescriptor

FIELDS_READ = frozenset(("model", "stream", "stream_include_usage", "stream_continuous_usage_stats"))
SPOOL_MEMORY_BYTES = 1024 * 1024  # a spooled form larger than this goes to a temporary file
# The values the gateway keeps: each field it reads up to this much, the other text fields up to this much in all
# (for the usage record's request body, when kept); the rest is passed on unread.
FIELD_BYTES_KEPT = 64 * 1024
_BLOCK = 64 * 1024  # how much of a spool is sent at a time
# Bytes held back at the end of the stream, so that parts can go in before the closing delimiter (and an
# epilogue of up to this much after it).
_TAIL = 4096


def audio_too_large() -> InvalidRequest:
    limit = settings.GATEWAY.AUDIO_MAX_BYTES
    return InvalidRequest(
        f"The audio upload is larger than the gateway accepts (AUDIO_MAX_BYTES, {limit / 1024 / 1024:g} MiB).",
        code=ErrorCode.REQUEST_TOO_LARGE,
    )


@dataclass(slots=True)
class _Part:
    name: str = ""
    is_file: bool = False
    dropped: bool = False  # a value longer than the gateway keeps
    value: bytearray = field(default_factory=bytearray)
    header: list[bytes] = field(default_factory=lambda: [b"", b""])


class FormScanner:
    """Feeds a multipart body through python-multipart as it passes, keeping the small text fields' values
    (the last of a repeated field, as vLLM reads them) and noting where the first file begins."""

    def __init__(self, boundary: bytes) -> None:
        self.fields: dict[str, str] = {}
        self.file_begun = False
        self.model_before_file = False
        self.late_field: str | None = None  # a field read after the file, when `model` came before it
        self.ended = False
        self.broken = False  # not readable as multipart: the rest goes on unread
        self._kept = 0
        self._part = _Part()
        callbacks = {
            "on_part_begin": self._begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_end": self._form_end,
        }
        self._parser: MultipartParser | None = None
        try:
            self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        except FormParserError:
            # A boundary python-multipart refuses (over 256 bytes; RFC 2046 allows 70): not read by the
            # gateway, passed on for the model server to judge, as any form the gateway cannot read.
            self.broken = True

    @property
    def routable(self) -> bool:
        """Whether the gateway has what it reads: `model` before the file, or the whole form."""
        return self.model_before_file or self.ended or self.broken

    def feed(self, data: bytes) -> None:
        if self.broken or self.ended or self._parser is None:
            return
        try:
            self._parser.write(data)
        except MultipartParseError:
            self.broken = True

    def _begin(self) -> None:
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._part.header[0] += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._part.header[1] += data[start:end]

    def _header_end(self) -> None:
        name, value = self._part.header
        if name.lower() == b"content-disposition":
            options = parse_options_header(value)[1]
            self._part.name = options.get(b"name", b"").decode("utf-8", "replace")
            self._part.is_file = b"filename" in options  # as Starlette tells a file from a text field
        self._part.header = [b"", b""]

    def _headers_finished(self) -> None:
        if self._part.is_file and not self.file_begun:
            self.file_begun = True
            self.model_before_file = "model" in self.fields

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part.is_file or part.dropped:
            return
        read = part.name in FIELDS_READ
        if len(part.value) + end - start > (FIELD_BYTES_KEPT if read else FIELD_BYTES_KEPT - self._kept):
            part.dropped = True
            part.value.clear()
            return
        part.value += data[start:end]
        if not read:
            self._kept += end - start

    def _end(self) -> None:
        part = self._part
        if part.is_file or part.dropped:
            return
        self.fields[part.name] = part.value.decode("utf-8", "replace")
        if self.model_before_file and part.name in FIELDS_READ and self.late_field is None:
            self.late_field = part.name

    def _form_end(self) -> None:
        self.ended = True


def _boundary(content_type: str) -> bytes | None:
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    return boundary if kind == b"multipart/form-data" and boundary else None


def _late(name: str) -> InvalidRequest:
    return InvalidRequest(
        f"The form field '{name}' came after the audio file, but the gateway had routed the upload by the fields "
        "before it. Send the text fields (model, stream, ...) before `file`, as the OpenAI client does.",
        code=ErrorCode.FORM_FIELD_AFTER_FILE,
        param=name,
    )


class FormUpload:
    """A form on its way to the model server (dispatch.base.FormBody): what was read to route it (spooled),
    then the rest as it arrives, counted against AUDIO_MAX_BYTES and watched for late fields."""

    def __init__(
        self,
        *,
        content_type: str,
        declared_length: int | None,
        boundary: bytes | None,
        scanner: FormScanner | None,
        spool: IO[bytes],
        received: int,
        rest: AsyncIterator[bytes] | None,
    ) -> None:
        self._content_type = content_type
        self._declared_length = declared_length
        self._boundary = boundary
        self._scanner = scanner
        self._spool = spool
        self._received = received
        self._rest = rest
        self._added = b""
        self._read = False

    @property
    def content_type(self) -> str:
        return self._content_type

    @property
    def declared_length(self) -> int | None:
        return None if self._declared_length is None else self._declared_length + len(self._added)

    @property
    def fields(self) -> dict[str, str]:
        """The text fields read (the values of at most FIELD_BYTES_KEPT in all)."""
        return dict(self._scanner.fields) if self._scanner is not None else {}

    def add_fields(self, fields: dict[str, str]) -> None:
        """Fields to add as the form's last parts (they win over the client's). A body that is not a
        multipart form gets none."""
        if self._boundary is None or not fields:
            return
        delimiter = b"--" + self._boundary + b"\r\n"
        self._added = b"".join(
            delimiter + f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
            for name, value in fields.items()
        )

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        if self._read:
            # The first endpoint tried has taken (part of) it: it cannot go to another one.
            raise UpstreamError("The audio upload could not be sent again to another endpoint.")
        self._read = True
        held = b""
        async with contextlib.aclosing(self._received_bytes()) as received:
            async for chunk in received:
                data = held + chunk
                held = data[-_TAIL:]
                if len(data) > _TAIL:
                    yield data[:-_TAIL]
        yield self._with_added(held)

    async def _received_bytes(self) -> AsyncGenerator[bytes, None]:
        """The spool read back, then the rest of the body as the client sends it."""
        self._spool.seek(0)
        while block := self._spool.read(_BLOCK):
            yield block
        self._spool.close()
        if self._rest is not None:
            async for chunk in self._rest:
                self._count(chunk)
                yield chunk

    def _count(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received > settings.GATEWAY.AUDIO_MAX_BYTES:
            raise audio_too_large()
        if self._scanner is not None:
            self._scanner.feed(chunk)
            if self._scanner.late_field is not None:
                raise _late(self._scanner.late_field)

    def _with_added(self, tail: bytes) -> bytes:
        """The last bytes of the form, with the added parts before its closing delimiter."""
        if not self._added or self._boundary is None:
            return tail
        at = tail.rfind(b"--" + self._boundary + b"--")
        return tail if at < 0 else tail[:at] + self._added + tail[at:]

    def close(self) -> None:
        self._spool.close()


async def form_read(*, content_type: str, content_length: int | None, chunks: AsyncIterator[bytes]) -> FormUpload:
    """Read a form until the gateway can route it (see the module's docstring); the rest is read as it is sent.

    Refused with 413 past AUDIO_MAX_BYTES: on its declared length before reading, and on what arrives.
    """
    limit = settings.GATEWAY.AUDIO_MAX_BYTES
    if content_length is not None and content_length > limit:
        raise audio_too_large()
    boundary = _boundary(content_type)
    scanner = FormScanner(boundary) if boundary is not None else None
    spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)  # noqa: SIM115  # FormUpload closes it
    received = 0
    rest: AsyncIterator[bytes] | None = chunks
    try:
        while scanner is not None and not scanner.routable:
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                rest = None
                break
            received += len(chunk)
            if received > limit:
                raise audio_too_large()
            scanner.feed(chunk)
            spool.write(chunk)
        if scanner is not None and scanner.late_field is not None:
            raise _late(scanner.late_field)
    except BaseException:
        spool.close()
        raise
    return FormUpload(
        content_type=content_type,
        declared_length=content_length,
        boundary=boundary,
        scanner=scanner,
        spool=spool,
        received=received,
        rest=rest,
    )


def form_parse(descriptor: RouteDescriptor, form: FormUpload) -> ParsedRequest:
    """The fields the gateway reads from a form's text fields, with vLLM's lax coercion (`stream=true`)."""
    fields = form.fields
    read = descriptor.fields
    include_usage = lax_bool(fields.get("stream_include_usage")) is True
    return ParsedRequest(
        body=fields,
        model=fields.get(read.model) or None,
        stream=read.stream is not None and lax_bool(fields.get(read.stream)) is True,
        include_usage=include_usage,
        continuous_usage=include_usage and lax_bool(fields.get("stream_continuous_usage_stats")) is True,
        n=1,
        max_tokens=next((value for name in read.max_tokens if (value := lax_int(fields.get(name))) is not None), None),
        form=form,
    )
