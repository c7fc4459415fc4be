"""Fail loudly, with the fix, when the Feast data folder is not set.

feature_store.yaml names its paths as ``${EHR_FEAST_DATA}/...``. Feast expands variables with
``os.path.expandvars``, which leaves an unset variable literal (Feast would then create a folder
named ``${EHR_FEAST_DATA}``) and resolves a relative value against this repo folder, not the
working directory. Feast imports every module of the repo on ``feast apply``, so this check runs
before anything is written. (``pipelines.features.feast_store.feature_store`` checks the same
before it opens a store.)
"""

import os
from pathlib import Path

FEAST_DATA_ENV = "EHR_FEAST_DATA"


class FeastDataNotSetError(RuntimeError):
    """EHR_FEAST_DATA is missing or not an absolute path."""


def feast_data_dir() -> Path:
    """The absolute folder of the registry and the online store, or a clear error."""
    value = os.environ.get(FEAST_DATA_ENV, "")
    if not value:
        raise FeastDataNotSetError(
            f"{FEAST_DATA_ENV} is not set: Feast would write to a folder literally named "
            f"'${{{FEAST_DATA_ENV}}}'. Fix: export {FEAST_DATA_ENV}=$PWD/data/work/feast "
            "(an absolute path), or open the store with "
            "pipelines.features.feast_store.feature_store(repo, data_dir, features_dir)."
        )
    if not Path(value).is_absolute():
        raise FeastDataNotSetError(
            f"{FEAST_DATA_ENV}={value!r} is relative: Feast resolves it against the feature "
            f"repo folder, not the working directory. Fix: export "
            f'{FEAST_DATA_ENV}="$(realpath {value})".'
        )
    return Path(value)


feast_data_dir()
