"""The 30-day readmission label, computed from the ``views.encounter`` and ``views.consent`` tables.

Definition (one row per index discharge):

* An index discharge is an inpatient encounter with a ``period_end``: its class is v3-ActCode
  ``IMP`` or one of its specialisations ``ACUTE`` and ``NONAC``, which the release keeps as sent
  (:data:`pipelines.features.cohort.INPATIENT_CLASS_CODES`, as the features' prior stays). Such
  an encounter is also what counts as a readmission. Encounters that did not take place
  (status ``planned``, ``cancelled`` or ``entered-in-error``,
  :data:`pipelines.features.cohort.ENCOUNTER_NOT_HELD`, as in the feature tables) are ignored
  everywhere: as index stays, as readmissions and in the data's end.
* One hospitalisation is one stay: an encounter part of another encounter of the same patient
  in the data that took place and is an inpatient stay or of its own class
  (``Encounter.partOf``, ``views.encounter.part_of_id``: an ICU or ward segment; a stay filed
  under the emergency visit it was admitted from is a stay) is no index discharge, no
  readmission and no transfer of its own; its parent is
  (:func:`pipelines.features.cohort.own_encounter_sql`, as the features' encounter counts and
  prior stays). Without the rule an ICU segment ending the evening before the ward segment began
  was an index discharge with label 1, though the patient never left hospital. A sub-encounter
  whose parent is not in the data (not released) counts as its own stay: it is the only record
  of it. Its times still count in the data's end. A ``views.encounter`` built before
  ``part_of_id`` existed reads every encounter as its own.
* ``event_timestamp`` is the discharge time (``period_end``). Features must be computed as of
  this instant, so nothing recorded after the discharge leaks into the prediction. A discharge
  dated to its day only (no time) is labelled at the end of that day, the latest instant it can
  stand for (``views.encounter.period_end_latest``): the features count a fact dated to a day
  from the end of that day, so at the day's start they would not even know the stay; an
  admission the features see at that instant is no readmission (so a fact is never both a
  feature and the outcome), and the 30 days still run from the day itself.
* ``label = 1`` when another inpatient encounter of the same patient *starts* in the half-open
  window ``(discharge, discharge + 30 days]``, else ``0``. The boundary is inclusive at exactly
  30 days and exclusive at the discharge instant itself. An admission is compared by what each
  bound can stand for: it starts after the discharge at the earliest instants both can stand for
  (when either is a date, on a later calendar day: de-identification shifts dates and drops the
  time of day, so an admission on the calendar day of discharge, a same-day transfer, is not a
  readmission), and the features do not yet know it at the label's time (its latest instant,
  ``period_start_latest``, is after the label's). An admission dated to the day after a discharge
  dated to its day is therefore a readmission: it is known only at the end of its own day,
  after the label's time. The two rules part only when a timed admission falls within the
  discharge day's span across zones (a discharge dated 10 March, an admission at 08:00Z on
  11 March, still 10 March west of UTC): the features see that admission at the label's time,
  and the rule that a fact is never both a feature and the outcome wins, since a model fitted
  on such a row would learn the outcome from its own input. Planned readmissions are not
  separated out: the views carry no reliable planned/unplanned marker.
* Censoring: the last data timestamp of the dataset is the latest ``period_start``/``period_end``
  over all encounters. A discharge whose window ends after it (``discharge + 30 days > last``)
  has incomplete follow-up and is dropped, whatever its outcome, so that early-readmitted
  positives are not over-represented among the recent discharges. Per-patient date shifts blur
  this dataset-level horizon: with shifts in [-R, R] days a patient's own data may end up to 2R
  days before the latest timestamp, so ``censor_margin_days`` (2R for de-identified data; the
  Dagster asset passes it) moves the cut that much earlier.
* Deaths: a discharge is dropped when the patient died at that stay, i.e. the discharge
  disposition is ``exp``/``20`` (expired), or ``views.patient`` (when present) records a
  ``deceased_date_time`` on or before the discharge date (compared by date, since shifted
  timestamps carry no time of day). A death with a time is compared by its UTC date with the
  discharge's UTC date. A death dated to its day only names no zone, and the discharge's date
  depends on the zone (a discharge on 10 June at a site at UTC+10, released without its time
  as 2024-06-10T00:00+10:00, is 9 June 14:00Z in the view): such a death counts at the
  stay when its day is on or before the discharge's date in some zone, i.e. in the zone
  furthest east (UTC+14). A death on a later day than that is later in every zone and keeps the
  stay, with label 0. The view keeps no mark of a date, which it reads as 00:00Z, so a death at
  exactly 00:00Z is read as a date (a time in UTC after de-identification is 00:00Z, known to
  its day only). Deaths after discharge stay in the denominator with label 0, as in the CMS
  hospital-wide readmission measure.
* Transfers (CMS hospital-wide readmission measure): a discharge to another hospital followed
  by an inpatient admission on the same or the next calendar day (UTC, as every instant here)
  is a transfer. The stays form one episode: the transferring stay is no index discharge
  (dropped and counted, ``transferred``), the receiving admission is no readmission of it, and
  the episode's index is its last discharge, whose 30 days run from there; a chain of transfers
  is one episode. A transfer is read from the discharge disposition the views carry
  (``views.encounter.discharge_disposition_code``, the HL7 coding first):
  :data:`TRANSFER_DISPOSITIONS`, HL7 ``other-hcf`` and the UB-04 codes of a transfer to an acute
  hospital. ``other-hcf`` names no kind of place, but the admission that must follow it is an
  inpatient stay, so the facility took the patient in as a hospital does; hospice, long-term
  care, psychiatric, rehabilitation and nursing dispositions are no transfer. A transfer
  disposition with no admission by the next day leaves an ordinary index discharge (the other
  hospital's stay is not in the data), and an admission the next day after any other
  disposition is a readmission.
* Research opt-out: every discharge of a patient who opted out of research is dropped, by the
  same rule the feature tables apply (:func:`pipelines.features.cohort.opted_out_sql`: an active
  consent scoped to research, or with no scope code the release carries, that denies at any
  level of its provisions or names ``OPTOUT``, or an active consent of any scope with a deny
  for a research purpose at any level; codes compared without regard to case).
* Patients absent from ``views.patient`` (when the view is present): every discharge of a
  patient the release holds no Patient for is dropped, as the feature tables leave them out. A
  patient withheld by k-anonymity has no rows in any view already; one whose encounters came
  before their Patient resource (or without one) is in no k-anonymity group yet, and their
  discharges reached the training set and the model, with every feature null.
* Dates known only to a month or a year (``views.encounter``'s ``*_latest`` columns more than
  two days after the start they are read as; Safe Harbor releases only years): a discharge so
  dated has no 30-day window, and one that an admission so dated may have followed within 30
  days (none known to the day did) has no known outcome. Both are dropped and counted
  (``imprecise``), rather than labelled from the first instant of the month or year.
* Every instant is counted in UTC, whatever the session's or the machine's time zone: the
  30 days after a discharge, the calendar days of a transfer, and the dates a death with a time
  and a discharge are compared by (a death dated to its day only: see Deaths).
* Two discharges of one patient that fall on the same (shifted) timestamp collapse into one row;
  its label is 1 if either is followed by a readmission.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb
import pandas as pd

from pipelines.features.cohort import (
    encounter_held_sql,
    inpatient_sql,
    opted_out_sql,
    own_encounter_sql,
    sql_list,
    timestamptz_sql,
    view_as_built,
)
from vault.catalog import table_columns

READMISSION_WINDOW_DAYS = 30
EXPIRED_DISPOSITIONS = ("exp", "20")
# The zone furthest east (UTC+14): where an instant has its latest calendar date
EAST_MOST_OFFSET_HOURS = 14
# Discharge dispositions of a transfer to another hospital: HL7 discharge-disposition
# ``other-hcf`` (the only code of that system not naming a kind of place that is no acute
# hospital: hospice, long-term care, psychiatric, rehabilitation, skilled nursing), and the
# UB-04 codes of a transfer to a short-term general, cancer or children's, or critical access
# hospital (02, 05, 66; 82, 85, 94 with a planned readmission).
TRANSFER_DISPOSITIONS = ("other-hcf", "02", "05", "66", "82", "85", "94")
LABEL_COLUMNS = ("patient_id", "event_timestamp", "label")


@dataclass(frozen=True)
class LabelCounts:
    """How many index discharges each rule kept or dropped (counts only, no identifiers)."""

    discharges: int
    censored: int
    died: int
    opted_out: int
    transferred: int  # discharged to another hospital that admitted the patient: no index
    imprecise: int  # the discharge or a possible readmission dated only to a month or year
    labelled: int
    positives: int

    @property
    def prevalence(self) -> float:
        return self.positives / self.labelled if self.labelled else 0.0


def _latest_bounds(con: duckdb.DuckDBPyConnection) -> tuple[str, str]:
    """The columns giving the latest instant each period bound can stand for (the views'
    ``*_latest`` columns); a ``views.encounter`` without them (built before they existed) is
    read as dated to the instant."""
    columns = table_columns(con, "encounter", "views")
    start, end = (
        f"{bound}_latest" if f"{bound}_latest" in columns else bound
        for bound in ("period_start", "period_end")
    )
    return start, end


def _dated_to_the_day(value: str, latest: str) -> str:
    """SQL: ``value`` is known at least to its day (a date, or a time): its latest instant is
    within two days of the start it is read as (a date spans 36 hours across time zones; a
    month or a year far more)."""
    return f"coalesce({latest} < {value} + INTERVAL 2 DAY, TRUE)"


# the days of the spans stays are paired by (:func:`_span_of`): a window's days after a
# discharge and the discharge's own day
_SPAN_DAYS = READMISSION_WINDOW_DAYS + 1


def _span_of(value: str) -> str:
    """SQL: the number of the span of :data:`_SPAN_DAYS` days (counted from 1970-01-01, UTC)
    that holds ``value``'s day. An admission in a discharge's window starts on the discharge's
    day or one of the 30 after it, so in the discharge's span or the next: matched on the
    patient and the span, each discharge is paired with the stays of two spans, not with
    every stay of its patient (whose number made the label's work its square: 8,000 stays of
    one patient took 17 s)."""
    days = f"date_diff('day', DATE '1970-01-01', CAST({value} AS DATE))"
    return f"CAST(floor({days} / {_SPAN_DAYS}) AS BIGINT)"


def _readmission_in(span: str, window: str) -> str:
    """SQL: a readmission after the discharge ``d`` (see the module docstring) starting in the
    span ``span`` (:func:`_span_of`)."""
    return f"""EXISTS (
            SELECT 1 FROM inpatient r
            WHERE r.patient_id = d.patient_id AND r.start_span = {span}
              AND r.id <> d.id AND r.start_dated
              -- after the discharge: on a later day when either is a date (a same-day
              -- admission is a transfer) ...
              AND r.period_start > d.period_end
              -- ... and not yet known to the features at the label's time: a date is known
              -- at its latest instant, so an admission dated the next day counts
              AND r.start_latest > d.end_latest
              AND r.period_start <= d.period_end + {window}
        )"""


def _transferred_sql() -> str:
    """SQL: the stay ``d`` ended in a transfer (CMS hospital-wide readmission measure): its
    disposition is a transfer to another hospital and another inpatient stay starts on the
    discharge's calendar day or the next (UTC) and ends after it (the receiving stay)."""
    return f"""(
        coalesce(d.discharge_disposition_code IN ({sql_list(TRANSFER_DISPOSITIONS)}), FALSE)
        AND ({" OR ".join(_receiving_stay_on(day) for day in ("d.end_day", "d.end_day + 1"))})
    )"""


def _receiving_stay_on(day: str) -> str:
    """SQL: an inpatient stay ``r`` other than ``d`` starting on ``day`` (known to the day) and
    ending after ``d``. Matched on the patient and the day, each patient's stays are paired
    with those of one day only, not with every other stay of theirs."""
    return f"""EXISTS (
            SELECT 1 FROM inpatient r
            WHERE r.patient_id = d.patient_id AND r.start_day = {day}
              AND r.id <> d.id AND r.start_dated
              AND coalesce(r.period_end > d.period_end, TRUE)
        )"""


def _death_at_stay_sql() -> str:
    """SQL: the patient ``p`` died at the stay ``d`` (see the module docstring): a death with a
    time on or before the discharge's UTC date; a death dated to its day only on or before the
    discharge's date in the zone furthest east (UTC+14), the latest date the discharge has in any
    zone. The view reads a date as its 00:00Z, and keeps no mark of it: a death at 00:00Z is read
    as a date (what de-identification leaves of a time in UTC is known to its day only anyway)."""
    death = "p.deceased_date_time"
    day = f"CAST({death} AS DATE)"
    dated_only = f"{death} = CAST({day} AS TIMESTAMPTZ)"
    discharge_day_east = f"CAST(d.period_end + INTERVAL {EAST_MOST_OFFSET_HOURS} HOUR AS DATE)"
    return f"""({death} IS NOT NULL AND (
        {day} <= CAST(d.period_end AS DATE)
        OR ({dated_only} AND {day} <= {discharge_day_east})
    ))"""


def _released_patient_sql(patient_cols: set[str]) -> str:
    """The condition on ``patient_id`` that keeps the patients ``views.patient`` releases, as
    the feature tables do: a patient absent from it (withheld by k-anonymity, or whose Patient
    the release does not hold, so no k-anonymity group was ever counted for them) has no label.
    Always true when there is no patient view."""
    return "patient_id IN (SELECT id FROM views.patient)" if "id" in patient_cols else "TRUE"


def _discharges_sql(
    con: duckdb.DuckDBPyConnection, censor_margin_days: int, known_by: datetime | None
) -> str:
    """Every index discharge with its label and the exclusion flags, as a SQL query."""
    patient_cols = table_columns(con, "patient", "views")
    has_deaths = {"id", "deceased_date_time"} <= patient_cols
    released = _released_patient_sql(patient_cols)
    death_join = "LEFT JOIN views.patient p ON p.id = d.patient_id" if has_deaths else ""
    death_at_stay = _death_at_stay_sql() if has_deaths else "FALSE"
    expired = sql_list(EXPIRED_DISPOSITIONS)
    window = f"INTERVAL {READMISSION_WINDOW_DAYS} DAY"
    start_latest, end_latest = _latest_bounds(con)
    # an encounter dated, even at its earliest, after everything the release can know does not
    # move the horizon (see pipelines.features.cohort.release_known_by)
    after_arrival = "true" if known_by is None else f"ts <= {timestamptz_sql(known_by)}"
    return f"""
    WITH enc AS (
        SELECT * FROM {view_as_built(con, "encounter")}
        WHERE {encounter_held_sql()}
    ),
    times AS (SELECT period_start AS ts FROM enc UNION ALL SELECT period_end FROM enc),
    horizon AS (SELECT max(ts) AS last_ts FROM times WHERE {after_arrival}),
    inpatient AS (
        SELECT id, patient_id, period_start, period_end, discharge_disposition_code,
            {start_latest} AS start_latest, {end_latest} AS end_latest,
            {_dated_to_the_day("period_start", start_latest)} AS start_dated,
            {_dated_to_the_day("period_end", end_latest)} AS end_dated,
            CAST(period_start AS DATE) AS start_day, CAST(period_end AS DATE) AS end_day,
            {_span_of("period_start")} AS start_span, {_span_of("period_end")} AS end_span
        FROM enc e WHERE {inpatient_sql()} AND patient_id IS NOT NULL AND {released}
          -- an ICU or ward segment of a stay in the data is no stay of its own
          AND {own_encounter_sql("enc", "e")}
    ),
    opted_out AS ({opted_out_sql(view_as_built(con, "consent"))})
    SELECT
        d.patient_id,
        -- the label's time is the latest instant the discharge can stand for, where the
        -- feature tables first know the stay ended: the discharge itself when it has a time,
        -- the end of its day when it is a date (the features see that whole day)
        d.end_latest AS event_timestamp,
        ({" OR ".join(_readmission_in(span, window) for span in ("d.end_span", "d.end_span + 1"))})
            AS readmitted,
        NOT d.end_dated AS discharge_undated,
        -- an admission known only to its month or year that may have started in the window
        EXISTS (
            SELECT 1 FROM inpatient r
            WHERE r.patient_id = d.patient_id AND r.id <> d.id AND NOT r.start_dated
              AND r.start_latest > d.period_end
              AND r.period_start <= d.period_end + {window}
        ) AS readmission_undated,
        d.period_end + {window} > h.last_ts - INTERVAL {int(censor_margin_days)} DAY AS censored,
        (coalesce(d.discharge_disposition_code IN ({expired}), FALSE) OR {death_at_stay}) AS died,
        d.patient_id IN (SELECT patient_id FROM opted_out) AS opted_out,
        {_transferred_sql()} AS transferred
    FROM inpatient d
    CROSS JOIN horizon h
    {death_join}
    WHERE d.period_end IS NOT NULL
    """


def readmission_labels_with_counts(
    con: duckdb.DuckDBPyConnection,
    censor_margin_days: int = 0,
    known_by: datetime | None = None,
) -> tuple[pd.DataFrame, LabelCounts]:
    """The label frame (see the module docstring) and the counts behind each exclusion;
    ``known_by`` bounds the encounter dates that set the horizon."""
    if censor_margin_days < 0:
        raise ValueError("censor_margin_days must not be negative")
    # 30 days after a discharge and the date of a death are counted in UTC, as the views store
    # instants and the feature tables count: in the session's zone (the machine's, by default)
    # a window across a daylight-saving change ends an hour off, and a death's date moves
    con.execute("SET TimeZone = 'UTC'")
    flagged = con.execute(_discharges_sql(con, censor_margin_days, known_by)).df()
    counts_censored = int(flagged["censored"].sum())
    died = flagged["died"] & ~flagged["censored"]
    opted_out = flagged["opted_out"] & ~flagged["censored"] & ~flagged["died"]
    transferred = flagged["transferred"] & ~(flagged["censored"] | flagged["died"])
    transferred &= ~flagged["opted_out"]
    # the outcome is unknown when the discharge, or an admission that may have followed it in
    # the window (and no admission known to the day did), is dated only to a month or a year
    undated = flagged["discharge_undated"] | (
        flagged["readmission_undated"] & ~flagged["readmitted"]
    )
    excluded = flagged["censored"] | flagged["died"] | flagged["opted_out"]
    excluded |= flagged["transferred"]
    imprecise = undated & ~excluded
    kept = flagged[~(excluded | undated)]
    labels = (
        kept.assign(label=kept["readmitted"].astype("int64"))
        .groupby(["patient_id", "event_timestamp"], as_index=False)["label"]
        .max()
        .sort_values(["patient_id", "event_timestamp"], kind="stable")
        .reset_index(drop=True)
    )
    labels["label"] = labels["label"].astype("int64")
    counts = LabelCounts(
        discharges=len(flagged),
        censored=counts_censored,
        died=int(died.sum()),
        opted_out=int(opted_out.sum()),
        transferred=int(transferred.sum()),
        imprecise=int(imprecise.sum()),
        labelled=len(labels),
        positives=int(labels["label"].sum()),
    )
    return labels[list(LABEL_COLUMNS)], counts


def readmission_labels(con: duckdb.DuckDBPyConnection, censor_margin_days: int = 0) -> pd.DataFrame:
    """One row per eligible inpatient discharge: ``patient_id``, ``event_timestamp`` (the
    discharge time, UTC) and ``label`` (1 = inpatient readmission within 30 days).

    Reads ``views.encounter``, ``views.consent`` and, when present, ``views.patient``. See the
    module docstring for the window, censoring, death and opt-out rules; ``censor_margin_days``
    pulls the censoring cut earlier to allow for per-patient date shifts.
    """
    return readmission_labels_with_counts(con, censor_margin_days)[0]
