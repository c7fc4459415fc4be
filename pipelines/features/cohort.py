"""The rules shared by the feature tables, their checks and the readmission label: who opted out
of research, which encounters took place, which encounters count on their own (not as part of
another), which encounters are inpatient stays, and which dates can be true.

A patient opted out when they have a Consent that is active and either

- is scoped to research, or of a scope the release holds no code for, and denies
  (``provision_type = 'deny'``, or a deny at any level of its provisions: ``deny_at_any_level``)
  or names the ``OPTOUT`` policy rule; or
- is of any scope and has a deny, at any level of its provisions, whose purpose is research
  (:data:`RESEARCH_PURPOSES` in ``deny_purpose_codes``).

FHIR nests exceptions in a provision (``provision.provision``, at any depth): an opt-out is often
written as a permit with a nested deny for research, under a research scope or under
``patient-privacy``. A nested permit under a deny does not undo the deny: the rule errs toward
leaving a patient out. Codes are compared without regard to case: sources write ``Research``,
``research`` or ``OptOut`` for the same thing, and a patient must not re-enter the data because
of how a clerk typed a code. For the same reason a scope given as text only
(``scope: {text: "Research"}``), whose text the release never carries, or by a code it withholds,
does not keep a denial or an ``OPTOUT`` from counting: what the patient asked is known, the
purpose it was asked for is not, and leaving out a patient who denied something else costs one
patient's rows, while keeping one who asked to be left out breaks their wish. A scope coded as
another purpose (``treatment``, ``patient-privacy``, ``adr``) is read as that purpose, and a
deny under it counts only when its own purpose is research. A status the release holds no code
for (``actve``: not in the required binding, so withheld) counts as active for the same reason:
the denial is known, whether it still stands is not; a status coded as another state (``draft``,
``inactive``, ``rejected``) is read as that state.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import duckdb

from vault.catalog import has_table, table_columns

# A date without a time spans 36 hours across time zones: a fact dated the day its export arrived
# can stand for an instant up to that long after the arrival.
DATE_SPAN = timedelta(days=2)


def sql_list(values: Iterable[str]) -> str:
    """Trusted string constants (codes the platform defines) as the items of a SQL list:
    ``'a', 'b'``."""
    return ", ".join(f"'{value}'" for value in values)


# The research purposes of use in v3-ActReason: HRESCH (healthcare research) and the codes that
# specialise it (HL7 Terminology 2.1.0): BIORCH (biomedical), CLINTRCH (clinical trial research)
# and its CLINTRCHNPC and CLINTRCHPC (without, with patient care), PRECLINTRCH (preclinical),
# DSRCH (disease specific), POARCH (population origins or ancestry), TRANSRCH (translational).
# A deny of one of them is a research opt-out whatever the consent's scope. Compared without
# regard to case or system: no other code system the sources use writes these codes, and one
# written without its system still names research.
RESEARCH_PURPOSES = (
    "HRESCH",
    "BIORCH",
    "CLINTRCH",
    "CLINTRCHNPC",
    "CLINTRCHPC",
    "PRECLINTRCH",
    "DSRCH",
    "POARCH",
    "TRANSRCH",
)

# View columns added after views were first built, and their types. A view built before one of
# them (its changed definition rebuilds it at the next refresh) reads it as NULL, what it would
# have held then: an encounter part of no other, its dates as written read as the UTC dates of
# its instants (a stay's length as it was counted); a consent whose top provision's type and
# policy rule count, as they did, with no nested denial; a request naming no Medication resource
# (its drug counted from its own code, as it was).
ADDED_VIEW_COLUMNS: dict[str, dict[str, str]] = {
    "encounter": {
        "part_of_id": "VARCHAR",
        "period_start_date": "DATE",
        "period_end_date": "DATE",
    },
    "medication_request": {"medication_id": "VARCHAR"},
    "condition": {"onset_end_date_time": "TIMESTAMPTZ"},
    "consent": {"deny_at_any_level": "BOOLEAN", "deny_purpose_codes": "VARCHAR[]"},
}


def view_as_built(con: duckdb.DuckDBPyConnection, view: str, table: str | None = None) -> str:
    """``views.<view>`` (or ``table``, ``schema.name``, trusted, with the view's columns) as the
    rules read it: the table itself, or, when it was built without some of the view's
    :data:`ADDED_VIEW_COLUMNS`, a parenthesised query adding them as NULL."""
    schema, name = (table or f"views.{view}").split(".")
    built = table_columns(con, name, schema)
    missing = [
        f'NULL::{type_} AS "{column}"'
        for column, type_ in ADDED_VIEW_COLUMNS.get(view, {}).items()
        if column not in built
    ]
    source = f"{schema}.{name}"
    return f"(SELECT *, {', '.join(missing)} FROM {source})" if missing else source


def opted_out_sql(consent: str = "views.consent") -> str:
    """A query of the distinct ``patient_id`` of every opted-out patient in ``consent`` (a table,
    view or parenthesised query with the columns of ``views.consent``: :func:`view_as_built`).
    Rows without a patient are left out, so the result can sit inside ``NOT IN`` (a NULL there
    would make every comparison unknown). A consent without a scope code counts as a research
    one, and one without a status code as active (the module's docstring says why)."""
    purposes = sql_list(RESEARCH_PURPOSES)
    return f"""
    SELECT DISTINCT c.patient_id FROM {consent} AS c
    WHERE c.patient_id IS NOT NULL
      AND coalesce(lower(c.status), 'active') = 'active'
      AND (
        (
          coalesce(lower(c.scope_code), 'research') = 'research'
          AND (lower(c.provision_type) = 'deny' OR c.deny_at_any_level
               OR upper(c.policy_rule_code) = 'OPTOUT')
        )
        OR EXISTS (
          SELECT 1 FROM unnest(c.deny_purpose_codes) AS denied(code)
          WHERE upper(denied.code) IN ({purposes})
        )
      )
    """


# Encounter statuses of an encounter that did not take place: planned (not begun when the data
# was exported: an appointment next month counts in no window, no label and no data end),
# cancelled, or entered in error. ``unknown`` and no status count as held.
ENCOUNTER_NOT_HELD = ("planned", "cancelled", "entered-in-error")


def encounter_held_sql(status: str = "status") -> str:
    """A SQL condition on the column ``status``: the encounter took place (its status is none
    of :data:`ENCOUNTER_NOT_HELD`, compared without regard to case)."""
    listed = sql_list(ENCOUNTER_NOT_HELD)
    return f"coalesce(lower({status}), '') NOT IN ({listed})"


# Encounter classes of an inpatient stay: v3-ActCode IMP and its specialisations ACUTE (acute
# inpatient) and NONAC (non-acute inpatient), which the release keeps as sent
# (deid.terminology). Codes of a code system are case-sensitive: compared as written.
INPATIENT_CLASS_CODES = ("IMP", "ACUTE", "NONAC")


def inpatient_sql(class_code: str = "class_code") -> str:
    """A SQL condition on the column ``class_code``: the encounter is an inpatient stay (its
    class is one of :data:`INPATIENT_CLASS_CODES`)."""
    listed = sql_list(INPATIENT_CLASS_CODES)
    return f"coalesce({class_code} IN ({listed}), FALSE)"


def own_encounter_sql(encounters: str, alias: str) -> str:
    """A SQL condition on the encounter ``alias`` (with ``id``, ``patient_id``, ``class_code``
    and ``part_of_id``, the columns of ``views.encounter``): it is an encounter of its own, not
    a segment of another encounter of the same patient in ``encounters`` (a table or view with
    those columns and ``status``) that took place and is an inpatient stay or of the same class.
    An ICU or ward segment of a hospitalisation (``Encounter.partOf``) is no stay or visit of its
    own: its parent is, and counting both would make one stay two (the segment's end an index
    discharge the patient never left hospital at). A stay recorded as part of an emergency or
    outpatient encounter (an admission from the emergency department, filed under the visit) is
    no segment of it: it is the only record of that stay, and the visit stays a visit. A
    sub-encounter whose parent is not in the data (not released, or did not take place) counts
    as its own: it is the only record of that visit. Of two encounters naming each other as
    parent, the one with the smaller id counts: dropping both would lose the stay."""
    return f"""NOT EXISTS (
        SELECT 1 FROM {encounters} parent
        WHERE parent.id = {alias}.part_of_id AND parent.patient_id = {alias}.patient_id
          AND parent.id <> {alias}.id AND {encounter_held_sql("parent.status")}
          AND ({inpatient_sql("parent.class_code")}
            OR parent.class_code IS NOT DISTINCT FROM {alias}.class_code)
          -- two encounters naming each other as parent (a data error): one of them counts
          AND (parent.part_of_id IS DISTINCT FROM {alias}.id OR {alias}.id > parent.id)
    )"""


def release_known_by(con: duckdb.DuckDBPyConnection, date_shift_days: int) -> datetime | None:
    """The latest instant a fact of the release can truly stand for: the arrival of its newest
    batch, plus the most its dates can have been shifted forward (``date_shift_days``), plus the
    span of a day across time zones. A fact dated later (2205 typed for 2025) is in the future
    of every export the release holds: it is no fact yet, and must not move the data end (and
    with it every patient's latest feature row, which the online store serves) or the label's
    follow-up horizon. None without the vault's batch ledger (views built on their own)."""
    if date_shift_days < 0:
        raise ValueError("date_shift_days must not be negative")
    if not has_table(con, "batches"):
        return None
    ((arrived,),) = con.execute("SELECT max(ingested_at) FROM batches").fetchall()
    if arrived is None:
        return None
    return arrived + timedelta(days=date_shift_days) + DATE_SPAN


def timestamptz_sql(value: datetime) -> str:
    """``value`` (an aware datetime) as a DuckDB TIMESTAMPTZ literal, in UTC."""
    return f"TIMESTAMPTZ '{value.astimezone(UTC).isoformat()}'"


def released_cohort(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Pseudonyms of the released patients (``views.patient``) who did not opt out of research,
    sorted: the patients the feature tables may hold."""
    present = {
        name
        for (name,) in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'views'"
        ).fetchall()
    }
    if "patient" not in present:
        return []
    excluded = (
        opted_out_sql(view_as_built(con, "consent"))
        if "consent" in present
        else "SELECT NULL WHERE false"
    )
    rows = con.execute(
        f"SELECT DISTINCT id FROM views.patient WHERE id IS NOT NULL "
        f"AND id NOT IN ({excluded}) ORDER BY id"
    ).fetchall()
    return [str(r[0]) for r in rows]
