"""Fail loudly, with the fix, when the Feast data folder is not set.

feature_store.yaml names its paths as ``${EHR_FEAST_DATA}/...``. Feast expands variables with
``os.path.expandvars``, which leaves an unset variable literal (Feast would then create a folder
named ``${EHR_FEAST_DATA}``) and resolves a relative value against this repo folder, not the
working directory. Feast imports every module of the repo on ``feast apply``, so this check runs
before anything is written. It is the one the registry store and
``pipelines.features.feast_store.feature_store`` make (``feast_data_from_env``), so a key pasted
into the variable is refused without being shown here too.
"""

from pipelines.features.feast_store import feast_data_from_env

feast_data_from_env()
