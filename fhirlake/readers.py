"""Streaming readers for FHIR R4 files: Bundles or single resources (``.json``), Bulk-export
NDJSON (``.ndjson``), and gzip of either. Every record keeps its file and position.

NDJSON is read line by line, so memory stays flat whatever the file size. A ``.json`` file is
one JSON document: below ``STREAM_JSON_BYTES`` it is parsed whole with orjson (fast, and what
per-patient or per-page bundles need); above it a Bundle is streamed entry by entry with ijson
(its C backend), in two passes: one collecting fullUrls, one yielding entries.
"""

from __future__ import annotations

import gzip
import os
import stat
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
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
            object.__setattr__(self, "name", self.path.name)


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
    for path in sorted(root.iterdir()):
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
        listing.files.append(SourceFile(len(listing.files), path, kind, name))


def _open(path: Path) -> IO[bytes]:
    # O_NOFOLLOW and a regular-file check on the open descriptor: the file listed may have been
    # replaced by a link or a fifo since (O_NONBLOCK keeps a fifo from blocking the open)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotARegularFileError
    handle = os.fdopen(fd, "rb")
    if path.name.lower().endswith(".gz"):
        return cast(IO[bytes], _GzipOverFile(handle))
    return handle


class NotARegularFileError(OSError):
    """A data file that is no longer a regular file when it is opened."""


class _GzipOverFile(gzip.GzipFile):
    """A gzip reader that closes the file it reads (GzipFile leaves a given file object open)."""

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


# What reading a file can raise once it is open: truncated or corrupt gzip, I/O errors, a
# streamed document that stops being JSON half-way.
_READ_ERRORS = (OSError, EOFError, zlib.error, ijson.JSONError)


def iter_records(
    source: SourceFile,
    stream_above: int = STREAM_JSON_BYTES,
    max_line_bytes: int | None = None,
) -> Iterator[RawRecord]:
    """The records of one file, in file order. A file that cannot be read to its end yields one
    more record for the rest of it, with the reason (the records before it stand), so every
    file counts at least one record in, even when it fails before its first. An NDJSON line
    longer than ``max_line_bytes`` (:data:`MAX_LINE_BYTES`) is one record with the reason
    ``record_too_large``."""
    position = 0
    max_line = MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes
    try:
        for record in _file_records(source, stream_above, max_line):
            position = record.position
            yield record
    except _READ_ERRORS as exc:
        code = "invalid_json" if isinstance(exc, ijson.JSONError) else "unreadable_file"
        # the exception's type only: its text can quote the file's bytes
        message = f"file could not be read from here on ({type(exc).__name__})"
        yield RawRecord(source.index, position + 1, None, (code, message))


def _file_records(
    source: SourceFile, stream_above: int, max_line_bytes: int
) -> Iterator[RawRecord]:
    if source.kind == "ndjson":
        yield from _ndjson_records(source, max_line_bytes)
    elif source.path.stat().st_size > stream_above and _streamable_bundle(source.path):
        yield from _streamed_bundle_records(source)
    else:
        yield from _json_records(source)


def _open_unbommed(path: Path) -> IO[bytes]:
    handle = _open(path)
    if handle.read(3) != BOM:
        handle.seek(0)
    return handle


def _streamable_bundle(path: Path) -> bool:
    """True when the document is a Bundle (read from its first events only)."""
    try:
        with _open_unbommed(path) as handle:
            for prefix, event, value in ijson.parse(handle):
                if prefix == "resourceType" and event == "string":
                    return bool(value == "Bundle")
                if prefix == "" and event == "end_map":
                    return False
    except ijson.JSONError:
        return False
    return False


def _streamed_bundle_records(source: SourceFile) -> Iterator[RawRecord]:
    """A large Bundle, entry by entry, with memory bounded by the largest entry."""
    shell: dict[str, Any] = {}
    # first pass: only fullUrl, type and id of each entry, for the urn map
    context = BundleContext()
    current: dict[str, str] = {}
    try:
        with _open_unbommed(source.path) as handle:
            for prefix, event, value in ijson.parse(handle, use_float=True):
                if prefix in ("resourceType", "type", "id") and event == "string":
                    shell[prefix] = value
                elif prefix == "entry.item.fullUrl" and event == "string":
                    current["fullUrl"] = value
                elif prefix == "entry.item.resource.resourceType" and event == "string":
                    current["type"] = value
                elif prefix == "entry.item.resource.id" and event == "string":
                    current["id"] = value
                elif prefix == "entry.item" and event == "end_map":
                    if {"fullUrl", "type", "id"} <= current.keys():
                        target = (current["type"], current["id"])
                        context.urn_map.setdefault(current["fullUrl"], target)
                    current = {}
    except ijson.JSONError:
        # ijson's message can quote input; report the position-free fact only
        yield RawRecord(source.index, 1, None, ("invalid_json", "not valid JSON (streamed)"))
        return
    if shell.get("type") not in _BUNDLE_TYPES:
        error = ("invalid_bundle", "Bundle.type is missing or not a Bundle type code")
    else:
        error = None
    with _open_unbommed(source.path) as handle:
        for position, entry in enumerate(ijson.items(handle, "entry.item", use_float=True), 1):
            problem = _entry_shell_error(position, entry)
            resource = entry.get("resource") if isinstance(entry, dict) else None
            raw = _dumps(resource if resource is not None else entry)
            if raw is None:
                yield RawRecord(source.index, position, None, _UNWRITABLE)
            elif error or problem:
                yield RawRecord(
                    source.index, position, raw, error or ("invalid_bundle", problem or "")
                )
            elif not isinstance(resource, dict):
                yield RawRecord(
                    source.index, position, raw, ("unsupported_entry", "entry has no resource")
                )
            else:
                yield RawRecord(source.index, position, raw, None, context)


def _ndjson_records(source: SourceFile, max_line_bytes: int) -> Iterator[RawRecord]:
    with _open(source.path) as handle:
        lineno = 0
        while line := handle.readline(max_line_bytes + 1):
            lineno += 1
            if len(line) > max_line_bytes and not line.endswith(b"\n"):
                _skip_rest_of_line(handle)
                message = f"NDJSON line longer than {max_line_bytes} bytes, not read"
                yield RawRecord(source.index, lineno, None, ("record_too_large", message))
                continue
            if lineno == 1 and line.startswith(BOM):
                line = line[len(BOM) :]
            line = line.strip()
            if line:
                yield RawRecord(source.index, lineno, line)


def _skip_rest_of_line(handle: IO[bytes]) -> None:
    while piece := handle.readline(_DRAIN_BYTES):
        if piece.endswith(b"\n"):
            return


def _json_records(source: SourceFile) -> Iterator[RawRecord]:
    with _open(source.path) as handle:
        data = handle.read()
    if data.startswith(BOM):
        data = data[len(BOM) :]
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        yield RawRecord(
            source.index, 1, data, ("invalid_json", f"not valid JSON ({exc.msg} at char {exc.pos})")
        )
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
    as validating a small resource, and the resource itself is validated on its own."""
    if not isinstance(entry, dict):
        return f"Bundle.entry[{position}]: not an object"
    if not entry.keys() <= _ENTRY_KEYS:
        return f"Bundle.entry[{position}]: unknown element"
    full_url = entry.get("fullUrl")
    if full_url is not None and (not isinstance(full_url, str) or not full_url.strip()):
        return f"Bundle.entry[{position}].fullUrl: not a non-empty uri"
    request = entry.get("request")
    if request is not None:
        method = request.get("method") if isinstance(request, dict) else None
        if not isinstance(method, str) or method not in _METHODS:
            return f"Bundle.entry[{position}].request.method: missing or not an HTTP verb code"
        if not isinstance(request.get("url"), str) or not request["url"].strip():
            return f"Bundle.entry[{position}].request.url: missing"
    response = entry.get("response")
    if response is not None and (
        not isinstance(response, dict) or not isinstance(response.get("status"), str)
    ):
        return f"Bundle.entry[{position}].response.status: missing"
    return None


def _bundle_shell_error(bundle: dict[str, Any]) -> tuple[str, str] | None:
    """Validate the Bundle without its entries (R4B model) and each entry's envelope."""
    btype = bundle.get("type")
    if not isinstance(btype, str) or btype not in _BUNDLE_TYPES:
        return ("invalid_bundle", "Bundle.type is missing or not a Bundle type code")
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return ("invalid_bundle", "Bundle.entry is not a list")
    try:
        Bundle.model_validate({k: v for k, v in bundle.items() if k != "entry"})
    except ValidationError as exc:
        return ("invalid_bundle", describe_validation_error("Bundle", exc))
    except Exception as exc:  # any validator failure is this file's reason
        return ("invalid_bundle", f"Bundle: {type(exc).__name__}")
    for position, entry in enumerate(entries, start=1):
        problem = _entry_shell_error(position, entry)
        if problem is not None:
            return ("invalid_bundle", problem)
    return None


def _urn_uuid(full_url: Any) -> str | None:
    if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
        candidate = full_url[len("urn:uuid:") :]
        try:
            return str(uuid.UUID(candidate)) if candidate else None
        except ValueError:
            return None
    return None


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
    each record that came in is accounted for."""
    entries = bundle.get("entry")
    shell_error = _bundle_shell_error(bundle)
    if not isinstance(entries, list) or not entries:
        if shell_error is not None:
            yield RawRecord(file_index, 1, _dumps(bundle), shell_error)
        return
    context = BundleContext()
    seen_full_urls: set[tuple[str, Any]] = set()
    duplicate_positions: set[int] = set()
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            continue
        resource = entry["resource"]
        full_url = entry.get("fullUrl")
        if not isinstance(resource.get("id"), str) and _urn_uuid(full_url):
            # transaction POSTs may omit the id; the urn:uuid is the id a server would keep
            resource["id"] = _urn_uuid(full_url)
        if not isinstance(full_url, str) or not full_url:
            continue
        # bdl-7: a fullUrl may repeat only with a different meta.versionId
        meta = resource.get("meta")
        version = meta.get("versionId") if isinstance(meta, dict) else None
        version = version if isinstance(version, str) else None  # a list or object is no key
        if (full_url, version) in seen_full_urls:
            duplicate_positions.add(position)
            continue
        seen_full_urls.add((full_url, version))
        rtype, rid = resource.get("resourceType"), resource.get("id")
        if isinstance(rtype, str) and isinstance(rid, str):
            context.urn_map[full_url] = (rtype, rid)
        else:
            target = literal_target(full_url)
            if target is not None:
                context.urn_map[full_url] = target
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            yield RawRecord(
                file_index,
                position,
                _dumps(entry),
                shell_error or ("invalid_bundle_entry", "Bundle entry is not an object"),
            )
            continue
        resource = entry.get("resource")
        raw = _dumps(resource if resource is not None else entry)
        if raw is None:
            yield RawRecord(file_index, position, None, _UNWRITABLE)
        elif shell_error is not None:
            yield RawRecord(file_index, position, raw, shell_error)
        elif not isinstance(resource, dict):
            method = (
                entry.get("request", {}).get("method")
                if isinstance(entry.get("request"), dict)
                else None
            )
            what = f" (request {method})" if isinstance(method, str) and method in _METHODS else ""
            yield RawRecord(
                file_index, position, raw, ("unsupported_entry", f"entry has no resource{what}")
            )
        elif position in duplicate_positions:
            yield RawRecord(
                file_index,
                position,
                raw,
                ("duplicate_full_url", "fullUrl and versionId repeat an earlier entry"),
            )
        else:
            yield RawRecord(file_index, position, raw, None, context)
