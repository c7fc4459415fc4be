"""The `dagster dev` session the webserver and browser tests share (started once per session)."""

from dagster_ui import ui_release

__all__ = ["ui_release"]
