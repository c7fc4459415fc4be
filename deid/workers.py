"""De-identification of a batch's records in chunks, on every core: each worker process loads the
policy once (its allow-list compiled once per resource type) and de-identifies the chunks it is
sent; the caller keeps a bounded number of chunks in flight, so memory stays flat whatever the
batch size. Small batches stay in the calling process (starting workers costs more than it
saves)."""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from typing import Any

import orjson

from deid.engine import Deidentifier, DeidSecrets, ProcessingError
from deid.errors import DeidError
from deid.policy import Policy
from deid.terminology import Terminology
from fhirlake.references import classify, local_target
from vault.ingest import EXIT_GRACE_SECONDS, STALLED_AFTER_SECONDS, end_workers
from vault.pseudonym import Pseudonymizer

CHUNK_RECORDS = 1_000
PARALLEL_FROM = 4_000  # records seen before worker processes are worth starting
_IN_FLIGHT_PER_WORKER = 4  # ~4 MB a chunk: enough to cover a worker's start
# A chunk takes about a second: none back for vault.ingest.STALLED_AFTER_SECONDS (ingest's
# own limit, and its end_workers) means a worker stopped answering, and the batch fails
# rather than wait for good.

# one resource's urn:uuid and conditional references as ingest resolved them: keyed reference
# text -> (target type, target pseudonym); they travel with the resource, not to every worker
Targets = dict[str, tuple[str, str]]
# references whose target the release takes from ingest's resolution of them (the reference
# graph), not from their text: a urn:uuid or an absolute URL names a Bundle entry by its fullUrl,
# and a conditional reference names whoever held the identifier
INGEST_RESOLVED_KINDS = ("urn", "conditional", "absolute")
# resource key, resource type, patient key, the resource as JSON, its resolved references
Item = tuple[str, str, str | None, bytes, Targets | None]


class RecordNotDeidentifiedError(DeidError):
    """A record whose de-identification raised an exception the engine did not expect (a bug,
    a value a library refuses): the batch fails, named by the resource's type, its key (a
    pseudonym) and the exception's type alone. The exception's own text, which may quote the
    record, is dropped where it is raised, in the worker, before anything carries it (the
    traceback a worker process sends back, Dagster's event log, the command's output)."""


class WorkersStalledError(DeidError):
    """No chunk came back from the worker processes for :data:`STALLED_AFTER_SECONDS`."""


class ChunkNotAccountedError(DeidError):
    """A chunk's result whose rows are not its records, one each, in order."""


@dataclass
class ChunkResult:
    """What one chunk gave: released rows (type, key, patient, JSON), withheld rows (type,
    patient, reason, message) and the counts the report is made of."""

    released: list[tuple[str, str, str | None, str]] = field(default_factory=list)
    withheld: list[tuple[str, str | None, str, str]] = field(default_factory=list)
    rules: Counter[int] = field(default_factory=Counter)
    labels: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    release_counts: Counter[str] = field(default_factory=Counter)
    # the first day after the release's day on which a resource of the chunk could come out
    # otherwise (deid.methods.DayHorizon), None when none depends on the day
    stable_until: date | None = None


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs to de-identify like the caller (picklable)."""

    policy_source: Any
    policy_name: str
    pseudonym_key: bytes
    today: date | None
    displays: dict[tuple[str, str], str]
    # this server's FHIR base (absolute references under it are local) and the pseudonyms of
    # erased patients (references to them are dropped, never re-pointed)
    server_base: str | None = None
    erased: frozenset[str] = frozenset()

    def build(self) -> _Worker:
        policy = Policy.from_dict(self.policy_source, self.policy_name)
        engine = Deidentifier(
            policy,
            DeidSecrets.derive(self.pseudonym_key, policy),
            today=self.today,
            terminology=Terminology(self.displays),
        )
        return _Worker(engine, Pseudonymizer(self.pseudonym_key), self.server_base, self.erased)


def _resolve_reference(
    worker: _Worker, targets: Targets | None, value: str
) -> tuple[str, str] | None:
    """The pseudonymous target of a reference in one resource: urn:uuid and conditional ones as
    ingest resolved them for that resource, and so an absolute one naming an entry of its
    Bundle by its fullUrl (``http://hospital.example/fhir/Patient/1``); literal ones to this
    server by their type and id. Another server's ``Patient/1`` is not ours (None: dropped),
    nor is an erased patient."""
    kind = classify(value)
    if kind in INGEST_RESOLVED_KINDS:
        found = targets.get(worker.pseudo.token("reference", value)) if targets else None
        if found is not None or kind != "absolute":
            return found
    literal = local_target(value, worker.server_base)
    if literal is None:
        return None
    key = worker.pseudo.resource_key(*literal)
    return None if key in worker.erased else (literal[0], key)


@dataclass
class _Worker:
    engine: Deidentifier
    pseudo: Pseudonymizer
    server_base: str | None = None
    erased: frozenset[str] = frozenset()

    def run(self, items: list[Item]) -> ChunkResult:
        result = ChunkResult()
        for resource_key, rtype, patient_key, raw, targets in items:
            resolve = partial(_resolve_reference, self, targets)
            try:
                outcome = self.engine.apply(
                    orjson.loads(raw), patient_scope=patient_key, resolve=resolve
                )
            except ProcessingError as exc:
                result.reasons[exc.code] += 1
                result.withheld.append((rtype, patient_key, exc.code, str(exc)))
                continue
            except Exception as exc:
                raise RecordNotDeidentifiedError(
                    f"de-identifying the {rtype} resource {resource_key} (resource key) raised "
                    f"{type(exc).__name__}; its message is not shown, as it may quote the record"
                ) from None
            result.rules.update(outcome.rule_counts)
            result.labels.update(outcome.labels)
            result.release_counts.update(outcome.release_counts)
            released = orjson.dumps(outcome.resource).decode()
            result.released.append((rtype, resource_key, patient_key, released))
        result.stable_until = self.engine.horizon.take()
        return result


_WORKER: _Worker | None = None


def _init_worker(setup: WorkerSetup) -> None:
    global _WORKER
    _WORKER = setup.build()


def _run_chunk(items: list[Item]) -> ChunkResult:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.run(items)


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def deidentify_items(
    items: Iterable[Item],
    setup: WorkerSetup,
    consume: Callable[[ChunkResult], None],
    workers: int | None = None,
    expected: int | None = None,
) -> None:
    """De-identify ``items`` and hand each chunk's result to ``consume`` in input order.
    ``expected`` (how many items are coming, when known) starts the workers at once, so they
    load while the first chunks are read."""
    workers = default_workers() if workers is None else workers
    chunks = _chunks(items)
    if workers > 1 and expected is not None and expected >= PARALLEL_FROM:
        _in_pool(chunks, setup, consume, workers)
        return
    local = setup.build()
    seen = 0
    for chunk in chunks:
        consume(_accounted(_keys(chunk), local.run(chunk)))
        seen += len(chunk)
        if workers > 1 and seen >= PARALLEL_FROM:
            _in_pool(chunks, setup, consume, workers)
            return


def _in_pool(
    chunks: Iterator[list[Item]],
    setup: WorkerSetup,
    consume: Callable[[ChunkResult], None],
    workers: int,
) -> None:
    # spawn: the caller holds a DuckDB connection and its threads, which a fork would copy
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(setup,)
    )
    try:
        pending: list[tuple[list[str], Future[ChunkResult]]] = []
        for chunk in chunks:
            pending.append((_keys(chunk), pool.submit(_run_chunk, chunk)))
            while len(pending) >= workers * _IN_FLIGHT_PER_WORKER:
                consume(_next_result(pending))
        while pending:
            consume(_next_result(pending))
    except BaseException:
        # the chunks still out are of no use: the workers are ended rather than waited for
        # (one that stopped answering would hold the shutdown for good)
        end_workers(pool)
        raise
    end_workers(pool, grace=EXIT_GRACE_SECONDS)


def _next_result(pending: list[tuple[list[str], Future[ChunkResult]]]) -> ChunkResult:
    keys, future = pending.pop(0)
    try:
        return _accounted(keys, future.result(timeout=STALLED_AFTER_SECONDS))
    except TimeoutError:
        raise WorkersStalledError(
            f"de-identification workers: no chunk came back for {STALLED_AFTER_SECONDS:g} s "
            "(a worker process stopped answering); the batch is not published, and the "
            "workers were ended"
        ) from None


def _keys(chunk: list[Item]) -> list[str]:
    return [item[0] for item in chunk]


def _accounted(keys: list[str], result: ChunkResult) -> ChunkResult:
    """``result`` when it accounts for the chunk of resources ``keys``: one row each, released
    or withheld, the released ones among the chunk's in its order; a worker's result that does
    not (short of a record, naming a resource it was not sent) fails the batch, rather than
    publish it without the record and its counts agreeing."""
    rows = len(result.released) + len(result.withheld)
    sent = iter(keys)
    if rows != len(keys) or not all(row[1] in sent for row in result.released):
        raise ChunkNotAccountedError(
            f"a de-identified chunk of {len(keys)} records came back with {rows} rows "
            f"({len(result.released)} released, {len(result.withheld)} withheld) that are not "
            "its records, one each: the batch is not published"
        )
    return result


def _chunks(items: Iterable[Item]) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= CHUNK_RECORDS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
