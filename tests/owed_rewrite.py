"""A warehouse file that owes a rewrite, for the tests of who performs it."""

from __future__ import annotations

from pathlib import Path

from vault import warehouse

# a wrapped data key's stand-in: the rows holding it are deleted, their pages freed
SECRET = b"wrapped-key-" + bytes(range(40))


def warehouse_owing_a_rewrite(path: Path) -> None:
    """A warehouse at ``path`` whose deleted rows (holding :data:`SECRET`) stay in freed pages,
    recording that it owes a rewrite, as an erasure killed between its commit and its rewrite
    leaves it."""
    con = warehouse.connect(path)
    try:
        con.execute("CREATE TABLE keys_t (v BLOB)")
        con.execute(
            "INSERT INTO keys_t SELECT ?::BLOB || range::VARCHAR FROM range(2000)", [SECRET]
        )
        con.execute("CHECKPOINT")
        con.begin()
        con.execute("DELETE FROM keys_t")
        warehouse.owe_rewrite(con, "an erasure")
        con.commit()
        con.execute("CHECKPOINT")
    finally:
        con.close()
    assert SECRET in path.read_bytes()  # the freed pages keep it
