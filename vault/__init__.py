"""PHI at rest: key providers and the keyring, sealing, data keys, pseudonyms, the warehouse
schema, landing and batch discovery, streaming ingest, the one decrypt-and-verify read path, the
audit log and the key lifecycle (rotation, erasure, re-identification).

Imports :mod:`fhirlake` and nothing else of the platform.
"""
