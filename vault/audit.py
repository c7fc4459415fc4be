"""An append-only, hash-chained audit log of privacy-relevant acts (re-identification,
erasure, key rotation).

One JSON object per line. Each entry carries the MAC of the entry before it (``prev``) and its
own HMAC-SHA256 (``mac``) over the canonical JSON of every other field, under the audit key the
key provider holds (separate from the pseudonym key every pipeline process holds): editing,
removing or reordering entries breaks the chain, and writing a consistent forged chain needs
the key. The head of the log (last ``seq`` and ``mac``, itself authenticated) is kept in a side
file ``<log>.head`` and in an anchor outside the work directory (next to the keyring, or in
``EHR_AUDIT_ANCHOR``), so cutting entries off the end, deleting the log, or restoring an older
copy of the log and its head are detected too. The head names the warehouse its log belongs to
and whether an outside anchor was written beside it (both under its MAC): another warehouse's
log, head and anchor copied in under this warehouse's id do not verify, and an outside anchor
deleted after a log was anchored is not adopted again from the side file (an older copy of the
log and head restored with it says the log was anchored). Deleting the log, its head and its
outside anchor together leaves what a warehouse without audited acts has: keep the anchors on a
volume the work directory's writers cannot change (``EHR_AUDIT_ANCHOR``).

Irreversible acts write an intent entry (``details.phase = "intent"``) before they start and a
completion entry (``"done"``) after; an intent that no later completion of the same act and
subject follows is reported by :meth:`AuditLog.verify` (the act was interrupted: run it again).

Entries name pseudonyms, key ids and counts, never original identifiers; the reason is the
operator's text as written (``ehr forget`` and ``ehr reidentify`` refuse one naming the
patient). Appending fails closed: a log whose tail does not match its head anchor, or whose
last entry does not verify under this key, is not written to (run :meth:`AuditLog.verify` to
see why).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import IO, Any

from vault.clock import Clock, utcnow
from vault.errors import AuditLogError
from vault.keys import KeyProvider, legacy_audit_key, replace_private_file

GENESIS = "0" * 64
AUDIT_KEY_BYTES = 32
HEAD_FORMAT = "ehr-audit-head/2"
# heads written before they named their warehouse and their outside anchor: still verified
# (the next append writes the current format)
HEAD_FORMAT_1 = "ehr-audit-head/1"
ENTRY_FIELDS = ("seq", "at", "actor", "action", "subject", "reason", "details", "prev", "mac")
ENV_AUDIT_ANCHOR = "EHR_AUDIT_ANCHOR"
OUTSIDE_ANCHOR = "outside anchor"  # the label of the anchor outside the work directory
PHASE_INTENT = "intent"
PHASE_DONE = "done"


def audit_key(pseudonym_key: bytes) -> bytes:
    """The audit MAC key of keyrings made before they held one (HKDF of the pseudonym key);
    kept to verify their entries. New keyrings and ``EHR_AUDIT_KEY`` give a key of its own."""
    if len(pseudonym_key) < 32:
        raise ValueError(f"pseudonym key must be at least 32 bytes, got {len(pseudonym_key)}")
    return legacy_audit_key(pseudonym_key)


def anchor_folder(provider: KeyProvider) -> Path:
    """Where the audit anchors live: ``EHR_AUDIT_ANCHOR`` when set, else an ``audit-anchors``
    folder beside the keyring file (held with the keys, outside every work directory), else
    ``~/.ehr/audit-anchors``."""
    configured = os.environ.get(ENV_AUDIT_ANCHOR)
    if configured:
        return Path(configured)
    key_file = getattr(provider, "path", None)
    if isinstance(key_file, Path):
        return key_file.parent / "audit-anchors"
    return Path.home() / ".ehr" / "audit-anchors"


def anchor_path(provider: KeyProvider, warehouse_id: str) -> Path:
    """The anchor of the audit log of the warehouse with this id."""
    if not warehouse_id or "/" in warehouse_id or warehouse_id.startswith("."):
        raise ValueError("a warehouse id is a plain file name")
    return anchor_folder(provider) / f"{warehouse_id}.json"


def default_actor() -> str:
    """The operating-system user running the process."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (containers without a passwd entry)
        return f"uid-{os.getuid()}"


def _lines(text: str) -> list[str]:
    """The log's lines, split at ``\\n`` alone, as they are written. ``str.splitlines`` also
    splits at U+2028, U+2029 and U+0085, which ``json.dumps(ensure_ascii=False)`` leaves
    unescaped: a reason holding one read as two corrupted entries, and no entry could be
    appended after it (an erasure committed, its completion refused)."""
    return [line for line in text.split("\n") if line.strip()]


def _why(exc: OSError) -> str:
    """An OS error's reason, without the paths it names (the caller names the log)."""
    return exc.strerror or type(exc).__name__


def _canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


@dataclass(frozen=True)
class AuditVerification:
    """The outcome of :meth:`AuditLog.verify`; problems name entry positions, never contents.
    ``incomplete`` lists intents no completion followed (interrupted acts to run again)."""

    ok: bool
    entries: int
    problems: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Head:
    seq: int
    mac: str
    # written with an outside anchor beside it (False in heads of the first format)
    outside: bool = False
    # the warehouse whose log it was written for ("" in heads of the first format)
    warehouse: str = ""
    # verified under the legacy key (written before the keyring got its audit key): it may
    # only name an entry under that key too (see AuditLog._forged_with_legacy_key)
    legacy: bool = False


class AuditLog:
    """Append entries to, read and verify one hash-chained audit log file."""

    def __init__(
        self,
        path: Path,
        key: bytes,
        *,
        clock: Clock = utcnow,
        anchor: Path | None = None,
        legacy_key: bytes | None = None,
        warehouse_id: str | None = None,
    ) -> None:
        if len(key) < 32:
            raise ValueError(f"audit key must be at least 32 bytes, got {len(key)}")
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        # the anchor outside the work directory: deleting or restoring the workdir's log and
        # head together does not move it
        self.anchor_path = Path(anchor) if anchor is not None else None
        # the warehouse the log belongs to, named in its heads ("" when not known)
        self._warehouse_id = warehouse_id or ""
        self._key = key
        self._legacy_key = legacy_key
        self._clock = clock

    @classmethod
    def for_provider(
        cls,
        path: Path,
        provider: KeyProvider,
        *,
        clock: Clock = utcnow,
        warehouse_id: str | None = None,
    ) -> AuditLog:
        """The log at ``path`` keyed with the provider's audit key, anchored outside the work
        directory when the warehouse id is known."""
        legacy = None
        if getattr(provider, "accepts_legacy_audit", False):
            legacy = legacy_audit_key(provider.pseudonym_key())
        anchor = anchor_path(provider, warehouse_id) if warehouse_id else None
        return cls(
            path,
            provider.audit_key(),
            clock=clock,
            anchor=anchor,
            legacy_key=legacy,
            warehouse_id=warehouse_id,
        )

    # -- MACs -----------------------------------------------------------------------------
    def _entry_mac(self, entry: dict[str, Any]) -> str:
        body = {k: v for k, v in entry.items() if k != "mac"}
        return hmac.new(self._key, _canonical(body), hashlib.sha256).hexdigest()

    def _entry_ok(self, entry: dict[str, Any]) -> bool:
        """The entry's MAC verifies under the audit key (or, for entries written before a
        keyring got its own audit key, under the legacy derived one)."""
        return self._mac_key(entry) is not None

    def _mac_key(self, entry: dict[str, Any]) -> str | None:
        """Which key the entry's MAC verifies under: ``"audit"``, ``"legacy"`` (the key derived
        from the pseudonym key, of entries written before the keyring got an audit key of its
        own) or None."""
        mac = str(entry.get("mac", ""))
        if hmac.compare_digest(mac, self._entry_mac(entry)):
            return "audit"
        if self._legacy_key is None:
            return None
        body = {k: v for k, v in entry.items() if k != "mac"}
        legacy = hmac.new(self._legacy_key, _canonical(body), hashlib.sha256).hexdigest()
        return "legacy" if hmac.compare_digest(mac, legacy) else None

    def _legacy_after_audit_key(self, before: dict[str, Any], entry: dict[str, Any]) -> bool:
        """An entry under the legacy key after one under the audit key: written after the
        migration by someone holding only the pseudonym key (every pipeline process does)."""
        return self._mac_key(before) == "audit" and self._mac_key(entry) == "legacy"

    def _head_body(self, seq: int, mac: str, outside: bool, warehouse: str) -> dict[str, Any]:
        """What a head's MAC covers: the last entry, the log's warehouse, and whether an
        outside anchor is written beside the side file."""
        return {
            "format": HEAD_FORMAT,
            "seq": seq,
            "mac": mac,
            "warehouse": warehouse,
            "outside": outside,
        }

    def _head_mac(self, body: dict[str, Any], key: bytes | None = None) -> str:
        return hmac.new(key or self._key, _canonical(body), hashlib.sha256).hexdigest()

    # -- files and locks ------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[IO[str]]:
        """The log file opened for append and read, under an flock: exclusive for writers,
        shared for readers, so a reader never sees half an append (line without anchor)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT
            fd = os.open(self.path, flags, stat.S_IRUSR | stat.S_IWUSR)
        except OSError as exc:
            raise AuditLogError(f"audit log {self.path} cannot be opened: {_why(exc)}") from exc
        with os.fdopen(fd, "a+", encoding="utf-8", newline="\n") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield handle
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _read_all(handle: IO[str]) -> str:
        handle.seek(0)
        return handle.read()

    def _anchors(self) -> list[tuple[str, Path]]:
        """(label, file) of every head anchor: the side file, and the outside one if any."""
        found = [("head anchor", self.head_path)]
        if self.anchor_path is not None:
            found.append((OUTSIDE_ANCHOR, self.anchor_path))
        return found

    @staticmethod
    def _read_head(path: Path) -> dict[str, Any] | None:
        """The anchor document, None when there is none; AuditLogError when unreadable."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuditLogError("audit head anchor is unreadable") from exc
        try:
            head = json.loads(text)
        except ValueError as exc:
            raise AuditLogError("audit head anchor is not JSON") from exc
        if not isinstance(head, dict):
            raise AuditLogError("audit head anchor is not a JSON object")
        return head

    def _authentic_head(self, head: dict[str, Any], outside_anchor: bool) -> _Head | None:
        """The head a document holds, when its MAC verifies under this log's key (or the
        legacy one); None otherwise. An outside anchor must name this log's warehouse (it is
        found by that id: another warehouse's, copied in under it, is refused); a side file
        may name another (a copy of a work directory, whose id was renewed)."""
        seq, mac, anchor_mac = head.get("seq"), head.get("mac"), head.get("anchor_mac")
        if not isinstance(seq, int) or not isinstance(mac, str) or not isinstance(anchor_mac, str):
            return None
        outside, warehouse = head.get("outside", False), head.get("warehouse", "")
        if not isinstance(outside, bool) or not isinstance(warehouse, str):
            return None
        if head.get("format") == HEAD_FORMAT:
            body: dict[str, Any] = self._head_body(seq, mac, outside, warehouse)
            if outside_anchor and warehouse != self._warehouse_id:
                return None
        else:  # the first format: no warehouse, no outside flag
            body = {"format": HEAD_FORMAT_1, "seq": seq, "mac": mac}
            outside, warehouse = False, ""
        if hmac.compare_digest(anchor_mac, self._head_mac(body)):
            return _Head(seq, mac, outside, warehouse)
        if self._legacy_key is not None and hmac.compare_digest(
            anchor_mac, self._head_mac(body, self._legacy_key)
        ):  # written before the keyring got its audit key
            return _Head(seq, mac, outside, warehouse, legacy=True)
        return None

    def _forged_with_legacy_key(self, head: _Head, entry: dict[str, Any]) -> bool:
        """A head under the legacy key naming an entry under the audit key: written after the
        migration by someone holding only the pseudonym key (every pipeline process does),
        to anchor a log cut short at that entry."""
        return head.legacy and self._mac_key(entry) == "audit"

    def _write_head(self, seq: int, mac: str) -> None:
        """The head written to the outside anchor first, then to the side file: a side file
        saying an outside anchor was written beside it is never ahead of that anchor, so an
        outside anchor found missing then was deleted, not left unwritten by a crash."""
        body = self._head_body(seq, mac, self.anchor_path is not None, self._warehouse_id)
        document = {**body, "anchor_mac": self._head_mac(body)}
        for _, path in reversed(self._anchors()):
            replace_private_file(path, json.dumps(document) + "\n")

    # -- appending ------------------------------------------------------------------------
    def _tail(self, text: str) -> list[dict[str, Any]]:
        """The last two entries of the log text, checked enough to chain onto; raises
        AuditLogError when the log cannot be safely appended to."""
        if text and not text.endswith("\n"):
            raise AuditLogError(
                "audit log ends with an incomplete line; run `ehr audit verify` before writing"
            )
        lines = _lines(text)
        tail: list[dict[str, Any]] = []
        for line in lines[-2:]:
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise AuditLogError("audit log's last entries are not JSON") from exc
            if not isinstance(entry, dict) or not isinstance(entry.get("seq"), int):
                raise AuditLogError("audit log's last entries are not audit entries")
            tail.append(entry)
        if tail and not self._entry_ok(tail[-1]):
            raise AuditLogError(
                f"audit entry {tail[-1]['seq']} does not verify under this key "
                "(edited entry or a different key); run `ehr audit verify`"
            )
        if len(tail) == 2 and self._legacy_after_audit_key(tail[0], tail[1]):
            raise AuditLogError(
                f"audit entry {tail[-1]['seq']} is under the legacy audit key after an entry "
                "under the audit key (written with the pseudonym key); run `ehr audit verify`"
            )
        self._check_anchor(tail)
        return tail

    def _check_anchor(self, tail: list[dict[str, Any]]) -> None:
        side: _Head | None = None  # the side file's head, read first
        for label, path in self._anchors():
            document = self._read_head(path)
            if document is None:
                # the first entry written, no side file after it (one naming it says the
                # append finished: an older copy of the log and side file restored)
                first_append_interrupted = (
                    len(tail) == 1
                    and tail[0]["seq"] == 0
                    and tail[0].get("prev") == GENESIS
                    and side is None
                )
                # A missing outside anchor is adopted from an intact side file written
                # without one (logs from before anchoring get theirs at their next entry) or
                # for another warehouse (a copy of a work directory, its id renewed). One the
                # side file of this warehouse says was written is not: deleted.
                adoptable = (
                    path != self.head_path
                    and side is not None
                    and (not side.outside or side.warehouse != self._warehouse_id)
                )
                if tail and not first_append_interrupted and not adoptable:
                    raise AuditLogError(f"audit {label} is missing; run `ehr audit verify`")
                continue
            head = self._check_one_anchor(label, document, tail, path != self.head_path)
            side = head if path == self.head_path else side

    def _check_one_anchor(
        self, label: str, document: dict[str, Any], tail: list[dict[str, Any]], outside: bool
    ) -> _Head:
        head = self._authentic_head(document, outside)
        if head is None:
            raise AuditLogError(
                f"audit {label} does not verify under this key or names another warehouse"
            )
        if not tail:
            raise AuditLogError(
                f"audit log is empty but its {label} says seq {head.seq} (deleted or truncated)"
            )
        last = tail[-1]
        named = next((entry for entry in tail if entry["seq"] == head.seq), None)
        if named is not None and self._forged_with_legacy_key(head, named):
            raise AuditLogError(
                f"audit {label} is under the legacy audit key but names an entry under the "
                "audit key (written with the pseudonym key); run `ehr audit verify`"
            )
        if head.seq == last["seq"] and hmac.compare_digest(head.mac, str(last["mac"])):
            return head
        # An append interrupted between the line and its anchor: the line is authentic
        # (its MAC verified above) and chains onto the anchored entry. The next anchor
        # write repairs it.
        if (
            len(tail) == 2
            and head.seq == tail[0]["seq"] == last["seq"] - 1
            and hmac.compare_digest(head.mac, str(tail[0].get("mac", "")))
            and last.get("prev") == head.mac
        ):
            return head
        raise AuditLogError(
            f"audit log ends at seq {last['seq']} but its {label} says {head.seq} "
            "(deleted, truncated or rolled back); run `ehr audit verify`"
        )

    def check_appendable(self) -> None:
        """Raise AuditLogError unless an entry could be appended now. Callers about to do
        something irreversible check first, so the act is never left unaudited."""
        with self._locked(exclusive=True) as handle:
            self._tail(self._read_all(handle))

    def append(
        self,
        action: str,
        subject: str,
        reason: str = "",
        details: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        """Append one entry (durably, with its anchor) and return it.

        ``subject`` is a pseudonym or key id, never an original identifier; ``details`` holds
        counts and ids and must be JSON-serialisable.
        """
        if not action or not action.strip():
            raise ValueError("action must be a non-empty string")
        if not subject or not subject.strip():
            raise ValueError("subject must be a non-empty string")
        if details is not None and not isinstance(details, dict):
            raise ValueError("details must be a dict")
        actor = actor if actor is not None else default_actor()
        if not actor.strip():
            raise ValueError("actor must be a non-empty string")
        at = self._clock()
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError("the audit clock must return timezone-aware datetimes")
        body: dict[str, Any] = {
            "seq": 0,
            "at": at.astimezone(UTC).isoformat(),
            "actor": actor,
            "action": action,
            "subject": subject,
            "reason": reason,
            "details": dict(details or {}),
            "prev": GENESIS,
        }
        try:
            _canonical(body)
        except (TypeError, ValueError) as exc:
            raise ValueError("details must be JSON-serialisable (no NaN or infinity)") from exc
        with self._locked(exclusive=True) as handle:
            tail = self._tail(self._read_all(handle))
            if tail:
                body["seq"] = tail[-1]["seq"] + 1
                body["prev"] = str(tail[-1]["mac"])
            entry = {**body, "mac": self._entry_mac(body)}
            self._write_line(handle, json.dumps(entry, ensure_ascii=False) + "\n")
            try:
                self._write_head(entry["seq"], entry["mac"])
            except OSError as exc:  # the line is durable: the next append repairs the heads
                raise AuditLogError(
                    f"audit entry {entry['seq']} written, its head anchors not: {_why(exc)}"
                ) from exc
        return entry

    def _write_line(self, handle: IO[str], line: str) -> None:
        """Append one line durably; on a failure (a full disk, an I/O error) the log is cut
        back to where it ended, so no partial line blocks the next append."""
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        data = line.encode("utf-8")
        try:
            # written on the descriptor (the file is opened O_APPEND), not through the text
            # wrapper, whose buffer would write the rest again when it is closed
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise AuditLogError(f"audit log {self.path} could not be written: {_why(exc)}") from exc

    def intend(
        self,
        action: str,
        subject: str,
        reason: str = "",
        details: dict[str, Any] | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        """The entry written before an irreversible act: if the act then crashes, the log
        still says it was started (and :meth:`verify` lists it until a completion follows)."""
        return self.append(
            action, subject, reason, {**(details or {}), "phase": PHASE_INTENT}, actor
        )

    def complete(
        self, intent: dict[str, Any], details: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The entry written after the act announced by ``intent`` took effect."""
        body = {**(details or {}), "phase": PHASE_DONE, "intent_seq": intent["seq"]}
        return self.append(
            str(intent["action"]),
            str(intent["subject"]),
            str(intent["reason"]),
            body,
            str(intent["actor"]),
        )

    # -- reading and verifying ------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Every entry, in file order (AuditLogError when a line is not a JSON object)."""
        if not self.path.exists():
            return []
        with self._locked(exclusive=False) as handle:
            text = self._read_all(handle)
        entries = []
        for position, line in enumerate(_lines(text)):
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise AuditLogError(f"audit entry {position} is not JSON") from exc
            if not isinstance(entry, dict):
                raise AuditLogError(f"audit entry {position} is not a JSON object")
            entries.append(entry)
        return entries

    def verify(self) -> AuditVerification:
        """Check every entry's MAC, the sequence, the chain and both head anchors; list the
        intents no completion followed."""
        if self.path.exists():
            with self._locked(exclusive=False) as handle:
                text = self._read_all(handle)
                heads = self._heads_for_verify()
        else:
            text = ""
            heads = self._heads_for_verify()
        problems: list[str] = []
        if text and not text.endswith("\n"):
            problems.append("end of log: incomplete last line (interrupted write or truncated)")
        lines = _lines(text)
        entries, last = self._verify_entries(lines, problems)
        for label, head_problem, head_doc in heads:
            outside = label == OUTSIDE_ANCHOR
            for problem in self._verify_head(head_problem, head_doc, lines, last, outside):
                problems.append(problem.replace("head anchor", label, 1))
        return AuditVerification(not problems, len(lines), problems, incomplete_acts(entries))

    def _verify_entries(
        self, lines: list[str], problems: list[str]
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Check each line in order (problems appended); returns the entries and the last."""
        prev: str | None = GENESIS
        last: dict[str, Any] | None = None
        keyed = False  # an entry under the audit key was seen: no legacy entry may follow
        entries: list[dict[str, Any]] = []
        for position, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                problems.append(f"entry {position}: not a JSON object (corrupted)")
                prev, last = None, None
                continue
            missing = [name for name in ENTRY_FIELDS if name not in entry]
            extra = sorted(set(entry) - set(ENTRY_FIELDS))
            if missing:
                problems.append(f"entry {position}: missing {', '.join(missing)} (edited)")
            if extra:
                problems.append(f"entry {position}: unexpected {', '.join(extra)} (edited)")
            seq = entry.get("seq")
            if seq != position:
                problems.append(f"entry {position}: seq {seq} out of order (removed or reordered)")
            if prev is not None and entry.get("prev") != prev:
                problems.append(
                    f"entry {position}: chain broken, prev does not match the entry before "
                    "(removed or reordered)"
                )
            key = self._mac_key(entry)
            if key is None:
                problems.append(f"entry {position}: mac mismatch (edited)")
            elif key == "legacy" and keyed:
                problems.append(
                    f"entry {position}: under the legacy audit key after entries under the "
                    "audit key (written with the pseudonym key)"
                )
            keyed = keyed or key == "audit"
            prev, last = str(entry.get("mac", "")), entry
            entries.append(entry)
        return entries, last

    def _heads_for_verify(self) -> list[tuple[str, str | None, dict[str, Any] | None]]:
        return [(label, *self._load_head_for_verify(path)) for label, path in self._anchors()]

    def _load_head_for_verify(self, path: Path) -> tuple[str | None, dict[str, Any] | None]:
        try:
            return None, self._read_head(path)
        except AuditLogError as exc:
            return f"head anchor: {exc}", None

    def _verify_head(
        self,
        head_problem: str | None,
        document: dict[str, Any] | None,
        lines: list[str],
        last: dict[str, Any] | None,
        outside: bool,
    ) -> list[str]:
        if head_problem is not None:
            return [head_problem]
        if document is None:
            return ["head anchor: missing (log replaced, or anchor deleted)"] if lines else []
        # an empty log with a valid anchor saying otherwise: the log was deleted
        head = self._authentic_head(document, outside)
        if head is None:
            return [
                "head anchor: does not verify under this key (edited, a different key, or "
                "another warehouse's)"
            ]
        if not lines:
            return [f"head anchor: log is empty, anchor says {head.seq} (truncated)"]
        if last is None:
            return ["head anchor: last entry is corrupted, cannot compare"]
        last_seq = last.get("seq")
        if not isinstance(last_seq, int):
            return [f"head anchor: last entry has no seq, anchor says {head.seq}"]
        if head.seq > last_seq:
            return [f"head anchor: log ends at seq {last_seq}, anchor says {head.seq} (truncated)"]
        if head.seq < last_seq:
            return [
                f"head anchor: log ends at seq {last_seq}, anchor says {head.seq} "
                "(anchor not updated: interrupted append, or an old anchor restored)"
            ]
        if not hmac.compare_digest(head.mac, str(last.get("mac", ""))):
            return [f"head anchor: entry {last_seq} is not the anchored one (replaced)"]
        if self._forged_with_legacy_key(head, last):
            return [
                "head anchor: under the legacy audit key but names an entry under the audit "
                "key (written with the pseudonym key)"
            ]
        return []


def open_intents(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Intent entries (``details.phase == "intent"``) that no later completion of the same
    action and subject follows: acts interrupted after they were announced, in log order."""
    pending: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in entries:
        details = entry.get("details")
        phase = details.get("phase") if isinstance(details, dict) else None
        key = (str(entry.get("action")), str(entry.get("subject")))
        if phase == PHASE_INTENT:
            pending.setdefault(key, []).append(entry)
        elif phase == PHASE_DONE:
            pending.pop(key, None)  # a completion settles every earlier intent (re-runs)
    return sorted(
        (entry for entries_of in pending.values() for entry in entries_of),
        key=lambda entry: int(entry.get("seq", -1)),
    )


def incomplete_acts(entries: list[dict[str, Any]]) -> list[str]:
    """:func:`open_intents`, named by seq, action and subject."""
    return [
        f"entry {int(entry.get('seq', -1))}: {entry.get('action')} of {entry.get('subject')} "
        "was announced but never completed; run it again"
        for entry in open_intents(entries)
    ]
