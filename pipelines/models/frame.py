"""How a generic training frame is read: which columns are features, which are numeric or
categorical, and which columns describe the subgroups the fairness audit looks at.

Feature names are never hard-coded: they come from the frame the feature store returns. Subgroup
attributes are recognised by the words in a column's name (``sex``/``gender``, ``age``, ``race``,
``ethnicity``), so renamed feature views keep working.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

ID_COLUMNS = ("patient_id", "event_timestamp", "encounter_id")
# Object columns holding only these kinds (plus missing) are numbers or flags: Feast returns a
# boolean or integer feature with missing rows as an object column.
NUMERIC_OBJECT_KINDS = ("boolean", "integer", "floating", "mixed-integer-float", "decimal")
AGE_BANDS = ("<45", "45-64", "65-79", "80+")
UNKNOWN = "unknown"


@dataclass(frozen=True)
class FeatureColumns:
    """The feature columns of a training frame, split by how they are encoded."""

    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    dropped: tuple[str, ...]

    @property
    def all(self) -> tuple[str, ...]:
        return self.numeric + self.categorical


def feature_columns(frame: pd.DataFrame, label: str, exclude: Sequence[str] = ()) -> FeatureColumns:
    """Every column except the label, the entity/timestamp columns and ``exclude``.

    Booleans and numbers (also object columns holding only those) are numeric; strings,
    categories and other objects are categorical. Date and
    time columns are dropped (a raw timestamp only encodes calendar drift of shifted dates), and
    so are columns without a single value (nothing to learn, and imputers reject them).
    """
    skip = {label, *ID_COLUMNS, *exclude}
    numeric: list[str] = []
    categorical: list[str] = []
    dropped: list[str] = []
    for name in frame.columns:
        if name in skip:
            continue
        dtype = frame[name].dtype
        if (
            ptypes.is_datetime64_any_dtype(dtype)
            or ptypes.is_timedelta64_dtype(dtype)
            or not frame[name].notna().any()
        ):
            dropped.append(str(name))
        elif (
            ptypes.is_bool_dtype(dtype)
            or ptypes.is_numeric_dtype(dtype)
            or (
                ptypes.is_object_dtype(dtype)
                and ptypes.infer_dtype(frame[name], skipna=True) in NUMERIC_OBJECT_KINDS
            )
        ):
            numeric.append(str(name))
        else:
            categorical.append(str(name))
    return FeatureColumns(tuple(numeric), tuple(categorical), tuple(dropped))


def as_float(frame: pd.DataFrame) -> np.ndarray:
    """Numeric (and nullable/boolean) columns as float64 with NaN for missing."""
    return frame.astype("float64").to_numpy()


def as_category_strings(frame: pd.DataFrame) -> np.ndarray:
    """Categorical columns as strings, missing values as their own category ``"missing"``."""
    filled = frame.astype("object").where(frame.notna(), "missing")
    return filled.astype(str).to_numpy()


def _name_tokens(name: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", name.lower())) - {""}


def find_column(
    frame: pd.DataFrame, words: Sequence[str], numeric: bool | None = None
) -> str | None:
    """The first column whose name contains one of ``words`` as a whole word (``a__b_c`` splits
    into ``a``, ``b``, ``c``); ``numeric`` restricts to numeric (True) or non-numeric (False)."""
    for name in frame.columns:
        if not _name_tokens(str(name)) & set(words):
            continue
        is_num = ptypes.is_numeric_dtype(frame[name].dtype) and not ptypes.is_bool_dtype(
            frame[name].dtype
        )
        if numeric is None or numeric == is_num:
            return str(name)
    return None


def age_band(age: pd.Series) -> pd.Series:
    """Age in years to the bands ``<45``, ``45-64``, ``65-79``, ``80+`` (missing -> unknown)."""
    years = pd.to_numeric(age, errors="coerce").astype("float64")
    bands = pd.cut(years, bins=[-np.inf, 45, 65, 80, np.inf], right=False, labels=list(AGE_BANDS))
    return bands.astype("object").where(bands.notna(), UNKNOWN).astype(str)


def subgroup_attributes(frame: pd.DataFrame) -> dict[str, pd.Series]:
    """The audit attributes present in the frame: ``sex``, ``age_band``, ``race``, ``ethnicity``.

    ``age_band`` is derived from a numeric age column when there is one, else taken from an
    already banded (string) age column. Missing values form their own ``unknown`` group.
    """
    attributes: dict[str, pd.Series] = {}

    def as_groups(col: str) -> pd.Series:
        values = frame[col].astype("object")
        return values.where(values.notna(), UNKNOWN).astype(str)

    sex = find_column(frame, ("sex", "gender"), numeric=False)
    if sex:
        attributes["sex"] = as_groups(sex)
    age = find_column(frame, ("age",), numeric=True)
    if age:
        attributes["age_band"] = age_band(frame[age])
    else:
        banded = find_column(frame, ("age",), numeric=False)
        if banded:
            attributes["age_band"] = as_groups(banded)
    race = find_column(frame, ("race",), numeric=False)
    if race:
        attributes["race"] = as_groups(race)
    ethnicity = find_column(frame, ("ethnicity",), numeric=False)
    if ethnicity:
        attributes["ethnicity"] = as_groups(ethnicity)
    return attributes
