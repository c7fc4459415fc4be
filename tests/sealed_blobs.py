"""Tampering with the sealed cache's stored parts, for the tests that check it is refused."""

import duckdb


def flip_a_sealed_byte(con: duckdb.DuckDBPyConnection, share: float = 0.5) -> None:
    """Flip one bit of the only stored part of the sealed cache, ``share`` of the way in."""
    ((blob,),) = con.execute("SELECT sealed FROM sealed_cache").fetchall()
    changed = bytearray(blob)
    changed[int(len(changed) * share)] ^= 0x01
    con.execute("UPDATE sealed_cache SET sealed = ?", [bytes(changed)])
