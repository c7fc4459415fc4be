"""Streaming readers for FHIR R4 files: Bundles or single resources (``.json``), Bulk-export
NDJSON (``.ndjson``), and gzip of either. Every record keeps its file and position.

NDJSON is read line by line, so memory stays flat whatever the file size. A ``.json`` file is
one JSON document: below ``STREAM_JSON_BYTES`` it is parsed whole with orjson (fast, and what
per-patient or per-page bundles need); above it a Bundle is streamed entry by entry with ijson
(its C backend), in two passes: one collecting fullUrls, one yielding entries. Any other
document longer than ``MAX_LINE_BYTES`` (what a record may be) is one ``record_too_large``
record, never read whole.
"""

from __future__ import annotations

import errno
import gzip
import io
import math
import os
import re
import stat
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import IO, Any, Literal, cast

import ijson
import orjson
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from fhirlake.references import literal_target
from fhirlake.validation import describe_validation_error

BOM = b"\xef\xbb\xbf"
FileKind = Literal["json", "ndjson"]
_SUFFIXES: dict[str, FileKind] = {
    ".json": "json",
    ".ndjson": "ndjson",
    ".json.gz": "json",
    ".ndjson.gz": "ndjson",
}
DATA_SUFFIXES = tuple(_SUFFIXES)  # what a data file's name ends with, to say so in messages
# Files an export carries beside its data: the Bulk Data status log, our generator's summary.
_NOT_DATA = {"log.ndjson", "log.ndjson.gz"}
STREAM_JSON_BYTES = 64 * 1024 * 1024
# An NDJSON line longer than this is one record quarantined unread (read in pieces and dropped):
# a line is held whole to be parsed, and one without an end would be the whole file.
MAX_LINE_BYTES = 64 * 1024 * 1024
_DRAIN_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A data file of a batch, with its index in the batch's ordered file list and its name
    within the batch (its path from the batch's folder, ``/``-separated: ``fhir/p1.json`` for a
    file in a sub-folder; the file's name for one directly in it)."""

    index: int
    path: Path
    kind: FileKind
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", name_as_text(self.path.name))


@dataclass(frozen=True, slots=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass(slots=True)
class BundleContext:
    """What an entry needs from its enclosing Bundle: fullUrl → (type, id)."""

    urn_map: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(slots=True)
class RawRecord:
    """One record as read: the resource bytes, or the reason it could not be read."""

    file_index: int
    position: int  # 1-based NDJSON line, or 1-based Bundle entry (1 for a single resource)
    raw: bytes | None
    error: tuple[str, str] | None = None
    bundle: BundleContext | None = None


def file_kind(path: Path) -> FileKind | None:
    name = path.name.lower()
    for suffix, kind in _SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


def not_regular(path: Path) -> str | None:
    """Why a folder entry is not a regular file to read, judged without following links: a
    symbolic link could point anywhere outside the landing folder, and opening a fifo or a
    device blocks or reads without end. None for a regular file; "" for a folder."""
    try:
        mode = path.lstat().st_mode
    except OSError:
        return "could not be inspected"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return ""
    if stat.S_ISLNK(mode):
        return "symbolic link (not followed)"
    return "special file (fifo, socket or device)"


# Folders a batch's folder may nest before the rest is listed as skipped, unread.
MAX_FOLDER_DEPTH = 8


@dataclass(slots=True)
class BatchListing:
    """What a batch's folder holds: its data files, what it passes over (with the reason), and
    the folders it reads (their times change when a file is added, removed or renamed)."""

    files: list[SourceFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)


def walk_batch(root: Path, nested: bool = False) -> BatchListing:
    """The data files of the batch in ``root`` (or ``root`` itself when it is a file), in the
    order of their paths; with ``nested`` (a landing batch's folder), those of its sub-folders
    too, as an export is often dropped with its own folders (Synthea's ``output/fhir``), down
    to ``MAX_FOLDER_DEPTH`` levels. Without it, sub-folders are passed over (the landing
    folder's loose files, whose sub-folders are batches of their own). Symbolic links and
    special files are listed as skipped, never followed or opened; so are hidden and ``_``
    folders and folders nested deeper, when nested."""
    listing = BatchListing()
    if root.is_file():
        _list_entry(root, root.name, listing)
        return listing
    listing.folders.append(root)
    for path, name in _batch_entries(root, nested, listing):
        _list_entry(path, name, listing)
    return listing


def list_batch_files(
    root: Path, nested: bool = False
) -> tuple[list[SourceFile], list[SkippedFile]]:
    """The files and skipped entries of :func:`walk_batch`."""
    listing = walk_batch(root, nested)
    return listing.files, listing.skipped


def _batch_entries(
    root: Path, nested: bool, listing: BatchListing, prefix: str = "", depth: int = 0
) -> Iterator[tuple[Path, str]]:
    """Every entry but the folders, with its name within the batch, depth first by name; the
    folders read and passed over go to ``listing``."""
    try:
        entries = sorted(root.iterdir())
    except OSError as exc:
        # its text holds the folder's path: the names of the folders a batch nests can be
        # patient names, as its file names can
        raise FolderNotReadableError(depth, exc) from None
    for path in entries:
        name = f"{prefix}{path.name}"
        if not_regular(path) != "":
            yield path, name
        elif not nested:
            continue  # the landing folder's sub-folders: each is a batch of its own
        elif path.name.startswith((".", "_")):
            listing.skipped.append(SkippedFile(path, "hidden or _ folder (not read)"))
        elif depth + 1 > MAX_FOLDER_DEPTH:
            reason = f"folder nested deeper than {MAX_FOLDER_DEPTH}"
            listing.skipped.append(SkippedFile(path, reason))
        else:
            listing.folders.append(path)
            yield from _batch_entries(path, True, listing, f"{name}/", depth + 1)


def _list_entry(path: Path, name: str, listing: BatchListing) -> None:
    odd = not_regular(path)
    if odd is not None:
        listing.skipped.append(SkippedFile(path, odd))
    elif path.name.startswith((".", "_")) or path.name.lower() in _NOT_DATA:
        listing.skipped.append(SkippedFile(path, "not a data file (export metadata)"))
    elif (kind := file_kind(path)) is None:
        listing.skipped.append(SkippedFile(path, "not a FHIR data file extension"))
    else:
        listing.files.append(SourceFile(len(listing.files), path, kind, name_as_text(name)))


def name_as_text(name: str) -> str:
    """A file name as text that any encoder takes: the bytes of a name that are not UTF-8
    (Python keeps them as lone surrogates, which a UTF-8 encoder refuses) written as ``\\xNN``
    escapes. A name in UTF-8, as nearly every one is, is itself."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _open(path: Path, state: _ReadState | None = None) -> IO[bytes]:
    # O_NOFOLLOW and a regular-file check on the open descriptor: the file listed may have been
    # replaced by a link or a fifo since (O_NONBLOCK keeps a fifo from blocking the open)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotARegularFileError
    handle = os.fdopen(fd, "rb")
    if path.name.lower().endswith(".gz"):
        return cast(IO[bytes], _Gunzip(handle, state or _ReadState()))
    return handle


def error_type_and_errno(cause: OSError) -> tuple[str, str]:
    """How an error of the file system is named where its text may not be shown (its text
    holds the path, and file and folder names can carry patient names): its type and errno
    name (``PermissionError``, ``EACCES``)."""
    return type(cause).__name__, errno.errorcode.get(cause.errno or 0, str(cause.errno))


class FolderNotReadableError(Exception):
    """A folder of a batch (its own, or one it nests) that could not be listed: permissions, an
    I/O error. Nothing of the batch can be known whole, so it is not read (as a data file the
    process may not read fails its batch). The folder is named by its depth under the batch's
    folder only, and the error by its type and errno name: the folder's path, which the
    underlying error's text holds, can carry patient names."""

    def __init__(self, depth: int, cause: OSError) -> None:
        self.depth = depth
        self.error_type, self.errno_name = error_type_and_errno(cause)
        where = (
            "the batch's folder"
            if depth == 0
            else f"a folder {depth} level{'s' if depth > 1 else ''} down in the batch"
        )
        super().__init__(
            f"{where} could not be listed ({self.error_type}, {self.errno_name}); "
            "the batch is not read until it can be"
        )


class NotARegularFileError(OSError):
    """A data file that is no longer a regular file when it is opened."""


@dataclass(slots=True)
class FileNote:
    """Something to know about a file that is no record: a gzip member whose trailer check
    failed after all its data was read (the records stand; nothing is left unread)."""

    file_index: int
    message: str


@dataclass(slots=True)
class _ReadState:
    """How far reading one file got: the bytes read after the last whole record when reading
    fails (they are quarantined with the failure), the position such a record takes, and a
    gzip failure found where a member ends (its message, and whether bytes are left unread)."""

    pending: bytes = b""
    next_position: int = 0
    damage: tuple[str, bool] | None = None


_GZIP_MAGIC = b"\x1f\x8b"
_GZIP_CHUNK = 128 * 1024
_FEXTRA, _FNAME, _FCOMMENT, _FHCRC = 4, 8, 16, 2


class _GzipEndError(Exception):
    """Reading stopped where a gzip member ends or begins (trailer or header): the data given
    so far is whole up to there."""


class _Gunzip(io.RawIOBase):
    """gzip members one after another (as ``gzip`` reads them), knowing where a failure lies.

    Inside a member's compressed data, a failure raises (``EOFError`` for data cut short,
    ``zlib.error`` for corrupt data), after every byte decompressed before it was returned.
    At a member's edge (a trailer whose CRC or length does not match, a cut trailer, a later
    member's header that is not gzip) the data given so far is whole: reading ends there as at
    the end of the file, and ``state.damage`` says what failed and whether bytes are left unread
    after it. A file whose first header is not gzip raises ``gzip.BadGzipFile``. Zero bytes
    after the last member are padding, as for ``gzip``."""

    def __init__(self, raw: IO[bytes], state: _ReadState) -> None:
        super().__init__()
        self._raw = raw
        self._state = state
        self._in = b""
        self._decompressor: Any = None  # zlib's Decompress, None between members
        self._crc = 0
        self._length = 0
        self._done = False
        self._members = 0

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        limit = _GZIP_CHUNK if size is None or size < 0 else size
        while not self._done and limit > 0:
            try:
                if self._decompressor is None and not self._begin_member():
                    self._done = True
                    break
                if self._decompressor.eof:
                    self._end_member()
                    continue
                if not self._in:
                    self._in = self._raw.read(_GZIP_CHUNK)
                    if not self._in:
                        raise EOFError("compressed data ends before its end-of-stream marker")
                data = self._decompressor.decompress(self._in, limit)
                self._in = (
                    self._decompressor.unused_data
                    if self._decompressor.eof
                    else self._decompressor.unconsumed_tail
                )
            except _GzipEndError as end:
                if not self._members:  # no data at all: the file is not gzip
                    raise gzip.BadGzipFile(str(end)) from None
                self._done = True
                self._state.damage = (str(end), self._left_unread())
                break
            if data:
                self._crc = zlib.crc32(data, self._crc)
                self._length += len(data)
                return data
        return b""

    def readall(self) -> bytes:
        parts = []
        while piece := self.read(_GZIP_CHUNK):
            parts.append(piece)
        return b"".join(parts)

    def _take(self, count: int) -> bytes:
        while len(self._in) < count:
            more = self._raw.read(_GZIP_CHUNK)
            if not more:
                raise _GzipEndError("gzip header or trailer cut short")
            self._in += more
        taken, self._in = self._in[:count], self._in[count:]
        return taken

    def _take_zero_terminated(self) -> None:
        while (end := self._in.find(b"\x00")) < 0:
            more = self._raw.read(_GZIP_CHUNK)
            if not more:
                raise _GzipEndError("gzip header cut short")
            self._in += more
        self._in = self._in[end + 1 :]

    def _begin_member(self) -> bool:
        """Read a member's header; False at the end of the file (or of its zero padding) after
        a member. An empty file holds none: it is no gzip (gzip never writes one; a write that
        failed does), where it read as a file of no records."""
        while not (self._in.lstrip(b"\x00") if self._members else self._in):
            self._in = self._raw.read(_GZIP_CHUNK)
            if not self._in and not self._members:
                raise _GzipEndError("empty file, no gzip member")
            if not self._in:
                return False
        if self._members:  # zero padding after a member is skipped, as gzip does
            self._in = self._in.lstrip(b"\x00")
        if not _GZIP_MAGIC.startswith(self._in[:2]):
            raise _GzipEndError("not a gzip member (magic number)")
        header = self._take(10)
        if header[:2] != _GZIP_MAGIC or header[2] != 8:
            raise _GzipEndError("not a gzip member (magic number or method)")
        flags = header[3]
        if flags & _FEXTRA:
            extra = self._take(2)
            self._take(int.from_bytes(extra, "little"))
        if flags & _FNAME:
            self._take_zero_terminated()
        if flags & _FCOMMENT:
            self._take_zero_terminated()
        if flags & _FHCRC:
            self._take(2)
        self._decompressor = zlib.decompressobj(-zlib.MAX_WBITS)
        self._crc = 0
        self._length = 0
        self._members += 1
        return True

    def _end_member(self) -> None:
        self._decompressor = None
        try:
            trailer = self._take(8)
        except _GzipEndError:
            self._in = b""  # a part of a trailer is nothing left to read
            raise _GzipEndError("gzip trailer cut short after all its data was read") from None
        crc = int.from_bytes(trailer[:4], "little")
        length = int.from_bytes(trailer[4:], "little")
        if crc != self._crc:
            raise _GzipEndError("gzip CRC check failed after all its data was read")
        if length != self._length & 0xFFFFFFFF:
            raise _GzipEndError("gzip length check failed after all its data was read")

    def _left_unread(self) -> bool:
        """True when bytes other than zero padding follow the point reading stopped at."""
        while True:
            if self._in.strip(b"\x00"):
                return True
            self._in = self._raw.read(_GZIP_CHUNK)
            if not self._in:
                return False


# What reading a file can raise once it is open: gzip data cut short or corrupt, I/O errors, a
# streamed document that stops being JSON half-way.
_READ_ERRORS = (OSError, EOFError, zlib.error, ijson.JSONError)
# The errors of opening or reading a file that are about the environment, not the file's
# content: the process may not read it (permissions), the disk or mount failed, descriptors or
# memory ran out. What the file holds is not known, so no record of it can be accounted for:
# the batch fails (FileNotReadableError) and is ingested again once the cause is fixed. Errors
# that carry no errno (a corrupt or cut gzip, a file no longer regular) are about the content.
_ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.EIO,
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOMEM,
        errno.ESTALE,
        errno.ETIMEDOUT,
    }
)


# A file listed with its batch and gone when it is opened or read: removed, or renamed with its
# folder, since the batch was listed. The folder changed while it was read and what the file
# held is not known: no record of it came in, so none is counted (it was one quarantined
# `unreadable_file` record, and the batch, renamed under its run, was marked ingested half).
_GONE_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR})


class FileNotReadableError(Exception):
    """A data file the process could not read for a reason of the environment (permissions,
    I/O, resources: :data:`_ENVIRONMENT_ERRNOS`; or gone since it was listed,
    :data:`_GONE_ERRNOS`), not of its content. It names the file by its index in the batch only
    (file names can hold PHI) and the error's type and errno name (its text holds the path)."""

    def __init__(self, file_index: int, cause: OSError) -> None:
        self.file_index = file_index
        self.gone = cause.errno in _GONE_ERRNOS
        self.error_type, self.errno_name = error_type_and_errno(cause)
        super().__init__(
            f"data file {file_index} of the batch could not be read "
            f"({self.error_type}, {self.errno_name})"
        )


# JSON's whitespace (RFC 8259): an NDJSON line of nothing else is blank. Python's strip() would
# also take \x0b and \x0c, which are no JSON: such a line is a record, and fails as invalid_json.
_JSON_WHITESPACE = b" \t\r\n"
# UTF-16 and UTF-32 byte-order marks: JSON exchanged between systems is UTF-8 (RFC 8259 8.1)
_WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


def unmarked_wide_form(raw: bytes) -> str | None:
    """The codec of text in UTF-16 or UTF-32 written without a byte-order mark (SQL Server's
    ``bcp -w``, ``iconv -t UTF-16LE``), told by where its first character's zero bytes stand,
    as RFC 4627 tells JSON's encoding: UTF-8 JSON holds no zero byte; None for any other. An
    NDJSON file so written is one record, as one with a mark is (:func:`_ndjson_records`), so
    this reads its first bytes. A line of such a file, as the reader cut one before, starts
    with the previous line feed's zero byte and reads as the other byte order, right for the
    characters below U+0100 only."""
    head = raw[:4]
    if len(head) == 4 and head[:3] == b"\0\0\0" and head[3]:
        return "utf-32-be"
    if len(head) == 4 and head[0] and head[1:] == b"\0\0\0":
        return "utf-32-le"
    if len(head) >= 2 and not head[0] and head[1]:
        return "utf-16-be"
    if len(head) >= 2 and head[0] and not head[1]:
        return "utf-16-le"
    return None


def iter_records(
    source: SourceFile,
    stream_above: int | None = None,
    max_line_bytes: int | None = None,
    notes: list[FileNote] | None = None,
) -> Iterator[RawRecord]:
    """The records of one file, in file order. A file that cannot be read to its end yields one
    more record for the rest of it, with the reason and the bytes of it that were read (the
    records before it stand), so every file counts at least one record in, even when it fails
    before its first. A gzip member whose trailer check fails after all its data was read
    leaves no rest: its records stand, and a :class:`FileNote` goes to ``notes``. An NDJSON
    line longer than ``max_line_bytes`` (:data:`MAX_LINE_BYTES`) is one record with the reason
    ``record_too_large``, and so is a ``.json`` document longer than it that is no Bundle to
    stream (read no further than the limit). A ``.json`` Bundle larger than ``stream_above``
    (:data:`STREAM_JSON_BYTES`) is streamed. A file the process may not read (permissions, I/O:
    not its content) raises :class:`FileNotReadableError`: nothing of its records is known."""
    position = 0
    state = _ReadState()
    max_line = MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes
    stream = STREAM_JSON_BYTES if stream_above is None else stream_above
    try:
        for record in _file_records(source, stream, max_line, state):
            position = record.position
            yield record
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS | _GONE_ERRNOS:
            yield _unreadable_rest(source, exc, position, state)
            return
        raise FileNotReadableError(source.index, exc) from None
    except _READ_ERRORS as exc:
        yield _unreadable_rest(source, exc, position, state)
        return
    if state.damage is not None:
        what, left_unread = state.damage
        if left_unread:
            message = f"{what}: the file could not be read from here on; none of it could be read"
            yield RawRecord(source.index, position + 1, None, ("unreadable_file", message))
        elif notes is not None:
            notes.append(FileNote(source.index, f"{what}; nothing after it: the records stand"))


def _unreadable_rest(
    source: SourceFile, exc: BaseException, position: int, state: _ReadState
) -> RawRecord:
    """The record for the rest of a file its content stopped being read at."""
    code = "invalid_json" if isinstance(exc, ijson.JSONError) else "unreadable_file"
    # the exception's type only: its text can quote the file's bytes
    kept = "the bytes read of it are kept" if state.pending else "none of it could be read"
    message = f"file could not be read from here on ({type(exc).__name__}); {kept}"
    at = max(position + 1, state.next_position)
    return RawRecord(source.index, at, state.pending or None, (code, message))


def _file_records(
    source: SourceFile, stream_above: int, max_line_bytes: int, state: _ReadState
) -> Iterator[RawRecord]:
    if source.kind == "ndjson":
        yield from _ndjson_records(source, max_line_bytes, state)
    elif _longer_than(source.path, min(stream_above, max_line_bytes)) and _streamable_bundle(
        source.path
    ):
        # a Bundle longer than a record may be is streamed whatever ``stream_above`` says
        yield from _streamed_bundle_records(source, state, max_line_bytes)
    else:
        yield from _json_records(source, state, max_line_bytes)


def _longer_than(path: Path, size: int) -> bool:
    """True when the file's data is longer than ``size`` bytes: a plain file's size, or a
    ``.gz`` file's data once decompressed (counted in pieces, none kept), since a gzip of
    JSON is often a twentieth of it. A gzip failing before ``size`` bytes is read whole,
    which accounts for the failure where it lies."""
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size > size
    seen = 0
    try:
        with _open(path) as handle:
            while piece := handle.read(_DRAIN_BYTES):
                seen += len(piece)
                if seen > size:
                    return True
    except _READ_ERRORS:
        return False
    return False


def _open_unbommed(path: Path, state: _ReadState | None = None) -> IO[bytes]:
    handle = _open(path, state)
    start = handle.read(3)
    if start != BOM:
        if isinstance(handle, _Gunzip):  # no seeking back: open it again
            handle.close()
            return _open(path, state)
        handle.seek(0)
    return handle


def _streamable_bundle(path: Path) -> bool:
    """True when the document is a Bundle (read from its first events only)."""
    try:
        with _open_unbommed(path) as handle:
            for prefix, event, value in ijson.parse(handle):
                if prefix == "resourceType" and event == "string":
                    return bool(value == "Bundle")
                if prefix == "" and event not in ("start_map", "map_key"):  # its end, or no object
                    return False
    except (ijson.JSONError, UnicodeDecodeError):
        return False
    return False


# the integers orjson (the read of a whole document) keeps as integers; any other is a double
_ORJSON_INTEGERS = range(-(2**63), 2**64)


def _json_number(value: int | Decimal) -> int | float:
    """A number of a streamed document as the read of a whole document (orjson) gives it: an
    integer within 64 bits an int, any other number a float, and one beyond a double's range
    no JSON this platform reads (:class:`ijson.JSONError`). The streamed passes parse numbers
    exactly (ijson's own floats, ``use_float``, stopped the parse at an integer beyond 64 bits,
    which made a whole streamed Bundle one unreadable record where the whole read loses one
    value's precision only)."""
    if isinstance(value, int) and value in _ORJSON_INTEGERS:
        return value
    try:
        number = float(value)
    except OverflowError:  # an integer literal beyond a double's range (10**400)
        number = math.inf
    if math.isinf(number):
        raise ijson.JSONError("number is infinity when parsed as double")
    return number


# orjson (the read of a whole document) refuses a document nested deeper than this
_MAX_JSON_DEPTH = 1024
# a \u escape of a UTF-16 surrogate, when an odd run of backslashes ends at its ``\``
# (after an even one, the backslashes are escaped ones, and the u is text)
_SURROGATE_ESCAPE = re.compile(rb"\\u([dD][89a-fA-F][0-9a-fA-F]{2})")
_HELD_BACK = 12  # a surrogate escape and the one after it may be cut by the end of a read


def _escaped(buf: bytes, at: int) -> bool:
    """True when the backslash at ``at`` is itself escaped: an odd number of them before it."""
    start = at
    while start > 0 and buf[start - 1] == 0x5C:
        start -= 1
    return (at - start) % 2 == 1


def _carried_from(buf: bytes) -> int:
    """Where the bytes left for the next read start: the last ones, where an escape may be cut,
    from an even number of backslashes into a run of them (escaped backslashes, nothing to look
    at), so that the rest of the run keeps its parity and what is carried stays short."""
    cut = max(len(buf) - _HELD_BACK, 0)
    run = cut
    while run > 0 and buf[run - 1] == 0x5C:
        run -= 1
    return run + (cut - run) // 2 * 2


class _SurrogateCheck:
    """A handle read on unchanged, raising :class:`ijson.JSONError` at a ``\\u`` escape of a
    UTF-16 surrogate that is not one half of a pair, which orjson refuses: ijson's C backend
    read a lone high surrogate as ``?`` (the record was accepted, its text changed) and paired
    one with whatever escape followed it. Only surrogate escapes are looked at, in C."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._carry = b""
        self._offset = 0  # the position in the document of ``_carry``'s first byte
        self._low_at = -1  # where the low half of a high surrogate escape must start

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        if size != 0:  # a parser may ask for nothing, to learn what the handle gives
            self._scan(self._carry + data, final=not data)
        return data

    def _scan(self, buf: bytes, final: bool) -> None:
        cut = len(buf) if final else _carried_from(buf)
        for match in _SURROGATE_ESCAPE.finditer(buf):
            if match.start() >= cut:
                break
            if _escaped(buf, match.start()):
                continue
            self._surrogate(self._offset + match.start(), int(match[1], 16))
            cut = max(cut, match.end())  # an escape is looked at once
        if 0 <= self._low_at < self._offset + cut:
            raise ijson.JSONError("lone surrogate in string")
        self._carry, self._offset = buf[cut:], self._offset + cut

    def _surrogate(self, start: int, unit: int) -> None:
        if self._low_at >= 0:
            if start != self._low_at or unit < 0xDC00:
                raise ijson.JSONError("lone surrogate in string")
            self._low_at = -1
        elif unit >= 0xDC00:
            raise ijson.JSONError("lone surrogate in string")
        else:
            self._low_at = start + 6


@dataclass(slots=True)
class _Outline:
    """What the first pass over a streamed Bundle learns: the Bundle without its entries, what
    its ``entry`` is, the first entry envelope defect, and the fullUrls (as in
    :func:`bundle_records`). A Bundle naming ``entry`` more than once is read as a parser of
    the whole document reads it: the last one stands (``entry_keys`` counts them)."""

    shell: dict[str, Any] = field(default_factory=dict)
    entry_is_list: bool = False
    entry_keys: int = 0
    entries: int = 0
    entry_problem: str | None = None
    urls: _FullUrls = field(default_factory=lambda: _FullUrls())


def _bundle_outline(handle: IO[bytes]) -> _Outline:
    """One pass over the parser's events with memory bounded by the largest entry envelope:
    each entry is built without its resource (only the resource's type, id and versionId are
    kept), since the fullUrl rules and the envelope checks need no more."""
    outline = _Outline()
    shell = ijson.ObjectBuilder()
    depth = 0
    top_key: Any = None
    envelope: Any = None
    entry_key: Any = None
    resource: dict[str, Any] | None = None
    resource_key: Any = None
    meta_key: Any = None
    for event, value in ijson.basic_parse(_SurrogateCheck(handle)):
        if event == "number":
            value = _json_number(value)
        opening = event in ("start_map", "start_array")
        if event in ("end_map", "end_array"):
            depth -= 1
        if depth >= _MAX_JSON_DEPTH and opening:
            raise ijson.JSONError("depth limit exceeded")
        if depth == 0:
            shell.event(event, value)
        elif depth == 1 and event == "map_key":
            top_key = value
            if value != "entry":
                shell.event(event, value)
            else:  # an earlier ``entry`` is what a later one replaces
                outline.entry_keys += 1
                outline.entries, outline.entry_problem, outline.urls = 0, None, _FullUrls()
        elif top_key != "entry":
            shell.event(event, value)
        elif depth == 1:
            if not event.startswith("end_"):  # the value's first event, not its last
                outline.entry_is_list = event == "start_array"
        elif not outline.entry_is_list:
            pass
        else:
            if depth == 2 and not event.startswith("end_"):
                outline.entries += 1
                envelope, entry_key, resource = ijson.ObjectBuilder(), None, None
            if depth == 3 and event == "map_key":
                entry_key = value
                envelope.event(event, value)
            elif entry_key == "resource" and depth >= 3:
                if depth == 3 and not event.startswith("end_"):
                    # the resource stands in the envelope as a placeholder, or as itself
                    envelope.event(*(("null", None) if opening else (event, value)))
                    resource = {} if event == "start_map" else None
                elif resource is not None and depth == 4 and event == "map_key":
                    resource_key, meta_key = value, None
                elif resource is not None and depth == 4 and event == "string":
                    if resource_key in ("resourceType", "id"):
                        resource[resource_key] = value
                elif resource is not None and resource_key == "meta" and depth == 5:
                    if event == "map_key":
                        meta_key = value
                    elif event == "string" and meta_key == "versionId":
                        resource["meta"] = {"versionId": value}
            else:
                envelope.event(event, value)
            if depth == 2 and not opening:  # the entry is complete
                entry = envelope.value
                problem = _entry_shell_error(outline.entries, entry)
                if outline.entry_problem is None:
                    outline.entry_problem = problem
                if isinstance(entry, dict):
                    entry["resource"] = resource
                outline.urls.add(outline.entries, entry)
        if opening:
            depth += 1
    outline.shell = shell.value
    return outline


# an entry of a streamed Bundle whose text was longer than a record may be: dropped as it was
# built, not kept
_TOO_LARGE = object()


class _CountedReads:
    """A handle read on unchanged, counting the bytes it gave (``count``)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.count += len(data)
        return data


def _parse_buffer(max_bytes: int) -> int:
    """The parser's read size for a limit of ``max_bytes``: what an entry's measured length may
    fall short of its text by, twice over (64 KiB at the 64 MiB limit, 1/1024 of it)."""
    return max(16, min(64 * 1024, max_bytes // 1024))


def _entry_values(handle: IO[bytes], occurrence: int, max_bytes: int) -> Iterator[Any]:
    """The items of the array of the Bundle's ``occurrence``-th ``entry`` key, built one at a
    time from the parser's events by their depth: ijson's prefixes would also take the value
    of a key named ``entry.item``, and the items of every ``entry`` key. An item whose text
    grows longer than ``max_bytes`` is dropped while it is built, and is :data:`_TOO_LARGE`.

    An item's length is the document's bytes read from its start less one read of the parser
    (which reads ahead by at most one): never more than its text, its escapes, non-ASCII
    characters and whitespace counted as bytes, as an NDJSON line's are."""
    depth = 0
    entry_keys = 0
    top_key: Any = None
    inside = False
    item: Any = None
    started = 0
    reads = _CountedReads(handle)
    buffer = _parse_buffer(max_bytes)
    for event, value in ijson.basic_parse(reads, buf_size=buffer):
        if event == "number":
            value = _json_number(value)
        opening = event in ("start_map", "start_array")
        if event in ("end_map", "end_array"):
            depth -= 1
        if depth == 1:
            if event == "map_key":
                top_key = value
                entry_keys += value == "entry"
            inside = opening and top_key == "entry" and entry_keys == occurrence
        elif inside:
            if depth == 2 and not event.startswith("end_"):
                item, started = ijson.ObjectBuilder(), reads.count
            if item is not None and reads.count - started - buffer > max_bytes:
                item = None  # the rest of the item is read, not kept
            if item is not None:
                item.event(event, value)
            if depth == 2 and not opening:  # the item is complete
                yield _TOO_LARGE if item is None else item.value
        if opening:
            depth += 1


def _streamed_bundle_records(
    source: SourceFile, state: _ReadState, max_bytes: int
) -> Iterator[RawRecord]:
    """A large Bundle, entry by entry, with memory bounded by the largest entry (one longer
    than ``max_bytes`` is a ``record_too_large`` record, dropped as it is read), accounted as
    :func:`bundle_records` accounts a Bundle read whole. A Bundle whose ``entry`` is missing,
    empty or no array holds no entries to stream, and a document whose last ``resourceType``
    is not ``Bundle`` is no Bundle: either is read whole, as a small one is, unless longer than
    ``max_bytes`` (one ``record_too_large`` record then)."""
    try:
        with _open_unbommed(source.path) as handle:
            outline = _bundle_outline(handle)
    except (ijson.JSONError, UnicodeDecodeError):  # the C backend decodes surrogates itself
        # ijson's message can quote input; report the position-free fact only
        yield RawRecord(source.index, 1, None, ("invalid_json", "not valid JSON (streamed)"))
        return
    # a document naming ``resourceType`` more than once is what its last one says, as for a
    # whole read: one whose first says Bundle may be no Bundle at all
    is_bundle = outline.shell.get("resourceType") == "Bundle"
    if not is_bundle or not outline.entry_is_list or not outline.entries:
        yield from _json_records(source, state, max_bytes)
        return
    shell_error = _bundle_shell_error(outline.shell, outline.entry_problem)
    too_large = f"Bundle entry longer than {max_bytes} bytes, not read"
    with _open_unbommed(source.path, state) as handle:
        entries = _entry_values(handle, outline.entry_keys, max_bytes)
        for position, entry in enumerate(entries, 1):
            if entry is _TOO_LARGE:
                yield RawRecord(source.index, position, None, ("record_too_large", too_large))
            else:
                yield _entry_record(source.index, position, entry, shell_error, outline.urls)


class _LineReader:
    """Lines from a byte stream, read in pieces. When reading fails, :attr:`pending` holds what
    was read of the line it was in (nothing when that line was too long and being skipped)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._buffer = bytearray()
        self._eof = False

    @property
    def pending(self) -> bytes:
        return bytes(self._buffer)

    def readline(self, limit: int) -> bytes:
        """The next line with its newline, or its first ``limit`` bytes; b"" at the end."""
        searched = 0
        while True:
            end = self._buffer.find(b"\n", searched, limit)
            if end >= 0:
                return self._cut(end + 1)
            if len(self._buffer) >= limit or self._eof:
                return self._cut(min(limit, len(self._buffer)))
            searched = len(self._buffer)
            piece = self._handle.read(_DRAIN_BYTES)
            if piece:
                self._buffer += piece
            else:
                self._eof = True

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes, whatever lines they hold."""
        while len(self._buffer) < limit and not self._eof:
            piece = self._handle.read(_DRAIN_BYTES)
            if piece:
                self._buffer += piece
            else:
                self._eof = True
        return self._cut(min(limit, len(self._buffer)))

    def skip_line(self) -> None:
        """Drop the rest of the current line, never holding more than one piece of it."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                del self._buffer[: end + 1]
                return
            self._buffer.clear()
            piece = self._handle.read(_DRAIN_BYTES)
            if not piece:
                self._eof = True
                return
            self._buffer += piece

    def skip_blank_line(self) -> bool:
        """Drop the rest of the current line while it holds JSON whitespace alone, one piece at
        a time: True when the line ended so (a blank line, however long), False at its first
        other byte, which is left to read."""
        while True:
            rest = bytes(self._buffer).lstrip(b" \t\r")
            del self._buffer[: len(self._buffer) - len(rest)]
            if rest:
                if rest.startswith(b"\n"):
                    del self._buffer[:1]
                    return True
                return False
            piece = self._handle.read(_DRAIN_BYTES)
            if not piece:
                self._eof = True
                return True
            self._buffer += piece

    def _cut(self, size: int) -> bytes:
        line = bytes(self._buffer[:size])
        del self._buffer[:size]
        return line


def _line_overlong(line: bytes, max_line_bytes: int) -> bool:
    """Whether ``line`` holds more than ``max_line_bytes`` before its end, LF or CRLF: a
    line of the limit ended by CRLF was refused where the same line ended by LF was read."""
    if line.endswith(b"\r\n"):
        return len(line) - 2 > max_line_bytes
    if line.endswith(b"\n"):
        return len(line) - 1 > max_line_bytes
    return len(line) > max_line_bytes


def _ndjson_records(
    source: SourceFile, max_line_bytes: int, state: _ReadState
) -> Iterator[RawRecord]:
    with _open(source.path, state) as handle:
        lines = _LineReader(handle)
        lineno = 0
        wide = b""  # the first line of a file that is one record whole (UTF-16, gzip data)
        try:
            # the limit and a line's end, LF or CRLF
            while line := lines.readline(max_line_bytes + 2):
                lineno += 1
                if _line_overlong(line, max_line_bytes):
                    ended = line.endswith(b"\n")
                    body = line[len(BOM) :] if lineno == 1 and line.startswith(BOM) else line
                    if not body.strip(_JSON_WHITESPACE) and (ended or lines.skip_blank_line()):
                        continue  # whitespace alone: blank, and uncounted, however long
                    message = f"NDJSON line longer than {max_line_bytes} bytes, not read"
                    yield RawRecord(source.index, lineno, None, ("record_too_large", message))
                    if not ended:
                        lines.skip_line()
                    continue
                if lineno == 1 and line.startswith(BOM):
                    line = line[len(BOM) :]
                elif lineno == 1 and (
                    line.startswith((*_WIDE_BOMS, _GZIP_MAGIC)) or unmarked_wide_form(line)
                ):
                    # read whole, not cut at 0x0a bytes: a wide form's line feed is two or four
                    # bytes, so a cut there left every later line a byte off (Ōta read as LŴa,
                    # a name past U+00FF gave no canary) and cut a name holding U+010A (Ċ),
                    # U+040A (Њ) or U+4E0A (上) in two
                    wide = line
                    yield _whole_file_record(source, line, lines, max_line_bytes)
                    return
                line = line.strip(_JSON_WHITESPACE)
                if line:
                    yield RawRecord(source.index, lineno, line)
        except _READ_ERRORS:
            if wide:
                # the file's one record, cut: all of it that was read, as a whole one is kept
                read = wide + lines.pending
                state.pending, state.next_position = read if len(read) <= max_line_bytes else b"", 1
                raise
            # the line being read when it failed: the one after the last line read
            state.pending, state.next_position = lines.pending, lineno + 1
            raise


_GZIP_DATA = "gzip data (compressed but not named .gz, or compressed twice)"


def _whole_file_record(
    source: SourceFile, first: bytes, lines: _LineReader, max_line_bytes: int
) -> RawRecord:
    """A UTF-16 or UTF-32 NDJSON file, or one of gzip data, is one record, not read as lines
    (its newlines are not single bytes; compressed bytes hold 0x0a bytes anywhere, and no
    line): the whole file, kept when it is no longer than a line may be."""
    rest = lines.read(max_line_bytes + 1 - len(first)) if len(first) <= max_line_bytes else b""
    data = first + rest
    kept = len(data) <= max_line_bytes and not lines.read(1)
    marked = "byte-order mark" if first.startswith(_WIDE_BOMS) else "no byte-order mark"
    what = (
        f"{_GZIP_DATA}: NDJSON must be text"
        if first.startswith(_GZIP_MAGIC)
        else f"UTF-16 or UTF-32 text ({marked}): NDJSON must be UTF-8"
    )
    message = f"{what}; the file is one record" + (
        "" if kept else f", longer than {max_line_bytes} bytes and not kept"
    )
    return RawRecord(source.index, 1, data if kept else None, ("invalid_json", message))


def _whole_document(source: SourceFile, state: _ReadState, max_bytes: int) -> bytes | None:
    """A document's bytes, read in pieces; None as soon as it is longer than ``max_bytes`` (a
    UTF-8 byte-order mark not counted), the rest left unread."""
    parts: list[bytes] = []
    size = 0
    with _open(source.path, state) as handle:
        try:
            while piece := handle.read(_DRAIN_BYTES):
                parts.append(piece)
                size += len(piece)
                if size > max_bytes + (len(BOM) if parts[0].startswith(BOM) else 0):
                    return None
        except _READ_ERRORS:
            state.pending = b"".join(parts)
            raise
    return b"".join(parts)


def _json_records(source: SourceFile, state: _ReadState, max_bytes: int) -> Iterator[RawRecord]:
    """The records of a JSON document read whole: at most ``max_bytes`` of it are read, and a
    longer one is one ``record_too_large`` record, not read on (nor kept)."""
    data = _whole_document(source, state, max_bytes)
    if data is None:
        message = f"JSON document longer than {max_bytes} bytes and no Bundle to stream, not read"
        yield RawRecord(source.index, 1, None, ("record_too_large", message))
        return
    if data.startswith(BOM):
        data = data[len(BOM) :]
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        why = _GZIP_DATA if data.startswith(_GZIP_MAGIC) else f"{exc.msg} at char {exc.pos}"
        yield RawRecord(source.index, 1, data, ("invalid_json", f"not valid JSON ({why})"))
        return
    if isinstance(obj, dict) and obj.get("resourceType") == "Bundle" and "entry" in obj:
        yield from bundle_records(source.index, obj)
    else:
        yield RawRecord(source.index, 1, data)


_BUNDLE_TYPES = {
    "document",
    "message",
    "transaction",
    "transaction-response",
    "batch",
    "batch-response",
    "history",
    "searchset",
    "collection",
}


_ENTRY_KEYS = {
    "id",
    "extension",
    "modifierExtension",
    "link",
    "fullUrl",
    "resource",
    "search",
    "request",
    "response",
}
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"}


def _entry_shell_error(position: int, entry: Any) -> str | None:
    """Bundle.entry minus its resource, checked by hand: the R4B model costs as much per entry
    as validating a small resource, and the resource itself is validated on its own. The
    message names the entry as FHIRPath and the schema's messages do, from 0 (``position``, the
    record's place in the file, counts from 1)."""
    at = f"Bundle.entry[{position - 1}]"
    if not isinstance(entry, dict):
        return f"{at}: not an object"
    if not entry.keys() <= _ENTRY_KEYS:
        return f"{at}: unknown element"
    full_url = entry.get("fullUrl")
    if full_url is not None and (not isinstance(full_url, str) or not full_url.strip()):
        return f"{at}.fullUrl: not a non-empty uri"
    request = entry.get("request")
    if request is not None:
        method = request.get("method") if isinstance(request, dict) else None
        if not isinstance(method, str) or method not in _METHODS:
            return f"{at}.request.method: missing or not an HTTP verb code"
        if not isinstance(request.get("url"), str) or not request["url"].strip():
            return f"{at}.request.url: missing"
    response = entry.get("response")
    if response is not None and (
        not isinstance(response, dict) or not isinstance(response.get("status"), str)
    ):
        return f"{at}.response.status: missing"
    return None


def _bundle_shell_error(
    bundle: dict[str, Any], entry_problem: str | None
) -> tuple[str, str] | None:
    """Validate the Bundle without its entries (R4B model); ``entry_problem`` is the first
    entry envelope defect (:func:`_entry_shell_error`), or why ``entry`` is not a list."""
    btype = bundle.get("type")
    if not isinstance(btype, str) or btype not in _BUNDLE_TYPES:
        return ("invalid_bundle", "Bundle.type is missing or not a Bundle type code")
    if entry_problem == _NOT_A_LIST:
        return ("invalid_bundle", entry_problem)
    try:
        Bundle.model_validate({k: v for k, v in bundle.items() if k != "entry"})
    except ValidationError as exc:
        return ("invalid_bundle", describe_validation_error("Bundle", exc))
    except MemoryError:  # says nothing of the record: the pass fails, to run again
        raise
    except Exception as exc:  # any validator failure is this file's reason
        return ("invalid_bundle", f"Bundle: {type(exc).__name__}")
    if entry_problem is not None:
        return ("invalid_bundle", entry_problem)
    return None


_NOT_A_LIST = "Bundle.entry is not a list"


def _first_entry_problem(entries: Any) -> str | None:
    if not isinstance(entries, list):
        return _NOT_A_LIST
    for position, entry in enumerate(entries, start=1):
        problem = _entry_shell_error(position, entry)
        if problem is not None:
            return problem
    return None


def _urn_uuid(full_url: Any) -> str | None:
    if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
        candidate = full_url[len("urn:uuid:") :]
        try:
            return str(uuid.UUID(candidate)) if candidate else None
        except ValueError:
            return None
    return None


def _assign_urn_id(entry: dict[str, Any]) -> None:
    """Transaction POSTs may omit the id; the urn:uuid fullUrl is the id a server would keep."""
    resource = entry.get("resource")
    if isinstance(resource, dict) and not isinstance(resource.get("id"), str):
        urn = _urn_uuid(entry.get("fullUrl"))
        if urn:
            resource["id"] = urn


@dataclass(slots=True)
class _FullUrls:
    """A Bundle's fullUrls, entry by entry: the urn map of its entries, and the entries that
    repeat a fullUrl with the same ``meta.versionId`` (bdl-7)."""

    context: BundleContext = field(default_factory=BundleContext)
    seen: set[tuple[str, Any]] = field(default_factory=set)
    duplicates: set[int] = field(default_factory=set)

    def add(self, position: int, entry: Any) -> None:
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            return
        _assign_urn_id(entry)
        resource = entry["resource"]
        full_url = entry.get("fullUrl")
        if not isinstance(full_url, str) or not full_url:
            return
        meta = resource.get("meta")
        version = meta.get("versionId") if isinstance(meta, dict) else None
        version = version if isinstance(version, str) else None  # a list or object is no key
        if (full_url, version) in self.seen:
            self.duplicates.add(position)
            return
        self.seen.add((full_url, version))
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if isinstance(rtype, str) and isinstance(rid, str):
            self.context.urn_map[full_url] = (rtype, rid)
        else:
            target = literal_target(full_url)
            if target is not None:
                self.context.urn_map[full_url] = target


# orjson writes at most 255 levels and 64-bit integers, and reads up to 1024 levels and
# arbitrary integers (through ijson): an entry beyond that cannot be carried as bytes.
_UNWRITABLE = ("schema_violation", "Bundle entry: nested too deeply, or a number out of range")


def _dumps(value: Any) -> bytes | None:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return None


def bundle_records(file_index: int, bundle: dict[str, Any]) -> Iterator[RawRecord]:
    """One record per Bundle entry. Bundle-level defects are reported on every entry, so that
    each record that came in is accounted for. A Bundle with no entry to report them on (its
    ``entry`` no array, or an empty one) is the file's one record: with its shell's defect, or
    checked as a resource, as a Bundle without ``entry`` is (an empty array breaks ele-1)."""
    entries = bundle.get("entry")
    shell_error = _bundle_shell_error(bundle, _first_entry_problem(entries))
    if not isinstance(entries, list) or not entries:
        yield RawRecord(file_index, 1, _dumps(bundle), shell_error)
        return
    urls = _FullUrls()
    for position, entry in enumerate(entries, start=1):
        urls.add(position, entry)
    for position, entry in enumerate(entries, start=1):
        yield _entry_record(file_index, position, entry, shell_error, urls)


def _entry_record(
    file_index: int,
    position: int,
    entry: Any,
    shell_error: tuple[str, str] | None,
    urls: _FullUrls,
) -> RawRecord:
    """The record of one Bundle entry (read whole or streamed)."""
    if not isinstance(entry, dict):
        return RawRecord(
            file_index,
            position,
            _dumps(entry),
            shell_error or ("invalid_bundle_entry", "Bundle entry is not an object"),
        )
    _assign_urn_id(entry)
    resource = entry.get("resource")
    raw = _dumps(resource if resource is not None else entry)
    if raw is None:
        return RawRecord(file_index, position, None, _UNWRITABLE)
    if shell_error is not None:
        return RawRecord(file_index, position, raw, shell_error)
    if not isinstance(resource, dict):
        request = entry.get("request")
        method = request.get("method") if isinstance(request, dict) else None
        what = f" (request {method})" if isinstance(method, str) and method in _METHODS else ""
        return RawRecord(
            file_index, position, raw, ("unsupported_entry", f"entry has no resource{what}")
        )
    if position in urls.duplicates:
        return RawRecord(
            file_index,
            position,
            raw,
            ("duplicate_full_url", "fullUrl and versionId repeat an earlier entry"),
        )
    return RawRecord(file_index, position, raw, None, urls.context)
