"""Images in asset metadata that the Dagster UI shows inline.

Dagster 1.13 has no image metadata type, and its Markdown renderer drops ``data:`` URLs, so a
base64 PNG in Markdown shows nothing (and, being long, hides behind "[Show Markdown]"). The
webserver does serve files of the instance's local compute-log folder under ``/logs/``: a plot
copied there (content-addressed, so every materialisation keeps its own) is a short Markdown
image the asset page renders in place."""

import hashlib
import shutil
from pathlib import Path

from dagster import AssetExecutionContext, DagsterInvariantViolationError, MetadataValue
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager

PLOTS_NAMESPACE = "ehr_plots"


def served_image_url(path: Path) -> str | None:
    """The webserver URL of a copy of ``path``, or None outside a run or when the instance keeps
    its compute logs elsewhere than on local disk."""
    try:
        context = AssetExecutionContext.get()
    except DagsterInvariantViolationError:  # called outside a run
        return None
    manager = context.instance.compute_log_manager
    if not isinstance(manager, LocalComputeLogManager) or path.suffix != ".png":
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:20]
    log_key = [PLOTS_NAMESPACE, digest, path.stem]
    target = Path(manager.get_captured_local_path(log_key, "png"))
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        shutil.copyfile(path, target)
    return "/logs/" + "/".join(log_key) + "/png"


def image_metadata(path: Path) -> MetadataValue:
    """A plot as Markdown the UI shows inline, or its path when it cannot be served."""
    url = served_image_url(path)
    if url is None:
        return MetadataValue.path(str(path))
    return MetadataValue.md(f"![{path.stem}]({url})")


def card_metadata(card: Path, plots: dict[str, Path]) -> MetadataValue:
    """The model card as Markdown, with its plots shown where it names them."""
    text = card.read_text(encoding="utf-8")
    images = []
    for name, path in plots.items():
        url = served_image_url(path)
        if url:
            images.append(f"### {name}\n\n![{name}]({url})")
    return MetadataValue.md(text + ("\n\n## Plots\n\n" + "\n\n".join(images) if images else ""))
