"""Synthetic FHIR R4 patient data (Synthea-shaped), deterministic for a seed."""

from fhirlake.synthetic.generator import GenerationSummary, generate

__all__ = ["GenerationSummary", "generate"]
