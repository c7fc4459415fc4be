"""The rules shared by the feature tables, their checks and the readmission label: who opted out
of research, and which encounters took place.

A patient opted out when they have a Consent that is active, scoped to research, and either
denies (``provision_type = 'deny'``) or names the ``OPTOUT`` policy rule. Codes are compared
without regard to case: sources write ``Research``, ``research`` or ``OptOut`` for the same
thing, and a patient must not re-enter the data because of how a clerk typed a code.
"""

from __future__ import annotations

import duckdb


def opted_out_sql(consent: str = "views.consent") -> str:
    """A query of the distinct ``patient_id`` of every opted-out patient in ``consent`` (a table
    or view with the columns of ``views.consent``). Rows without a patient are left out, so the
    result can sit inside ``NOT IN`` (a NULL there would make every comparison unknown)."""
    return f"""
    SELECT DISTINCT patient_id FROM {consent}
    WHERE patient_id IS NOT NULL
      AND lower(status) = 'active' AND lower(scope_code) = 'research'
      AND (lower(provision_type) = 'deny' OR upper(policy_rule_code) = 'OPTOUT')
    """


# Encounter statuses of an encounter that did not take place: planned (not begun when the data
# was exported: an appointment next month counts in no window, no label and no data end),
# cancelled, or entered in error. ``unknown`` and no status count as held.
ENCOUNTER_NOT_HELD = ("planned", "cancelled", "entered-in-error")


def encounter_held_sql(status: str = "status") -> str:
    """A SQL condition on the column ``status``: the encounter took place (its status is none
    of :data:`ENCOUNTER_NOT_HELD`, compared without regard to case)."""
    listed = ", ".join(f"'{s}'" for s in ENCOUNTER_NOT_HELD)
    return f"coalesce(lower({status}), '') NOT IN ({listed})"


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
    excluded = opted_out_sql("views.consent") if "consent" in present else "SELECT NULL WHERE false"
    rows = con.execute(
        f"SELECT DISTINCT id FROM views.patient WHERE id IS NOT NULL "
        f"AND id NOT IN ({excluded}) ORDER BY id"
    ).fetchall()
    return [str(r[0]) for r in rows]
