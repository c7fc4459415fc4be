"""The one entity: a released patient, keyed by its pseudonym."""

from feast import Entity, ValueType

patient = Entity(
    name="patient",
    join_keys=["patient_id"],
    value_type=ValueType.STRING,
    description="A released patient; patient_id is the 32-hex pseudonym of the de-identified "
    "release (never a source identifier).",
    tags={"owner": "data-platform", "sensitivity": "pseudonymous"},
)
