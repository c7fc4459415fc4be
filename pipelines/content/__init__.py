"""The platform's content, shipped as package data and read with :mod:`importlib.resources`:
the SQL-on-FHIR ViewDefinitions and the value sets (``fhir/``, language-neutral FHIR JSON) and the
Feast repo template (``feature_repo/``).

In the source tree ``pipelines/content/fhir`` and ``pipelines/content/feature_repo`` are links to
the top-level folders, so there is one copy of each file; a wheel carries the files themselves.
"""

from __future__ import annotations

from importlib.resources import as_file, files
from pathlib import Path


def _content_path(*parts: str) -> Path:
    resource = files(__name__).joinpath(*parts)
    # a wheel or an editable install keeps package data as plain files: as_file is a no-op there
    with as_file(resource) as path:
        return Path(path)


def views_dir() -> Path:
    """The folder of the platform's ViewDefinitions (one JSON file per view)."""
    return _content_path("fhir", "views")


def valuesets_dir() -> Path:
    """The folder of the value sets the feature tables use (FHIR ValueSet JSON)."""
    return _content_path("fhir", "valuesets")


def feature_repo_dir() -> Path:
    """The Feast repo: feature_store.yaml and the declarative feature definitions."""
    return _content_path("feature_repo")
