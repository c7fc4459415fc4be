"""Statistics of a built feature table for its Dagster metadata: the null rate of every feature
and one PNG of their distributions (aggregates only, never a row).

No group of fewer than k patients (the release's k) is shown: a numeric or year axis runs from
the k-th smallest to the k-th largest value, with the values beyond counted in the end bins
(top- and bottom-coding), so its ends are never one patient's extreme value, and a feature with
fewer than 2k values gets no histogram; a bin, flag or code of fewer than k patients is not drawn
(rarer codes are drawn together as one bar when they hold k or more), and when what a panel
leaves hidden could be told from its total (the patients with a value, which the null share and
the table's patient count give) a further count is hidden with it.

The distributions are taken over each patient's latest row (the value the online store serves):
the change point rows repeat a patient's values many times, which would weigh long records more.
DuckDB computes them in one query (histogram counts, flag counts, the most frequent codes), so no
row reaches Python; the PNG is drawn from those counts with Pillow (rectangles, lines and Pillow's
own font), not matplotlib, whose text layout alone took ~0.15-0.3 s a table: the plot runs for
every feature table after every batch, and that dominated a refresh after a small batch. A
plot is drawn again only when its distributions changed (the PNG records their digest)."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from deid.kanon import DEFAULT_K
from pipelines.features.tables import FEATURES_SCHEMA
from pipelines.publish import write_replacing

KEY_COLUMNS = ("patient_id", "event_timestamp", "created")
# equal-width bins over [low, high], the k-th smallest and k-th largest value, as
# numpy.histogram(np.clip(values, low, high), bins=BINS)
BINS = 20
TOP_CODES = 8
GRID_COLUMNS = 4
CELL_INCHES = (3.0, 2.2)
TITLE_INCHES = 0.4
DPI = 80
BLUE, GREY = "#4477aa", "#999999"
FLAG_LABELS = ("false", "true")
NOTE_POINTS = 5

Kind = Literal["number", "year", "flag", "code"]
_NUMERIC = {
    *("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "FLOAT", "DOUBLE"),
    *("UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT"),
}
_TIMES = {
    "DATE",
    "TIMESTAMP",
    "TIMESTAMP WITH TIME ZONE",
    "TIMESTAMP_S",
    "TIMESTAMP_MS",
    "TIMESTAMP_NS",
}


@dataclass(frozen=True)
class Distribution:
    """One feature over the latest rows. ``number`` and ``year`` (a date's year) features have
    ``counts`` per bin of edges ``linspace(low, high, BINS + 1)`` (the last bin includes
    ``high``), ``low`` and ``high`` being the k-th smallest and k-th largest value and the
    values beyond counted in the first and last bin (``single`` when those two are one value:
    the range is then widened by 0.5 each side, as numpy does, and every value counted in its
    middle bin); none (``()``) when fewer than 2k values are finite. ``flag`` features count
    ``FLAG_LABELS``, and ``code`` features their ``TOP_CODES`` most frequent labels of at least
    k patients, most frequent first, then ``other (<k)``, the patients of the rarer labels
    together. A count of None is hidden: under k, or hidden with one (see :func:`_shown`).
    ``present`` (the patients with a value) is not drawn as such, only as the title's null
    share (see :func:`_title`)."""

    feature: str
    kind: Kind
    rows: int
    present: int
    counts: tuple[int | None, ...]
    labels: tuple[str, ...] = ()
    low: float = 0.0
    high: float = 1.0
    k: int = 1
    single: bool = False

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, BINS + 1)


def null_rates(con: duckdb.DuckDBPyConnection, name: str) -> dict[str, float]:
    """Share of null values per feature over all rows (rounded to 4 places)."""
    columns = list(feature_kinds(con, name))
    if not columns:
        return {}
    select = ", ".join(f"avg(({_q(c)} IS NULL)::INT) AS {_q(c)}" for c in columns)
    row = con.execute(f"SELECT {select} FROM {FEATURES_SCHEMA}.{name}").fetchone() or ()
    return {c: round(float(v or 0.0), 4) for c, v in zip(columns, row, strict=True)}


def feature_kinds(con: duckdb.DuckDBPyConnection, name: str) -> dict[str, Kind]:
    """Each feature column of ``features.<name>`` (table order) and how it is summarised."""
    return {
        str(column): _kind(str(sql_type))
        for column, sql_type, *_ in con.execute(f"DESCRIBE {FEATURES_SCHEMA}.{name}").fetchall()
        if column not in KEY_COLUMNS
    }


def _kind(sql_type: str) -> Kind:
    if sql_type == "BOOLEAN":
        return "flag"
    if sql_type in _TIMES:
        return "year"
    if sql_type in _NUMERIC or sql_type.startswith("DECIMAL("):
        return "number"
    return "code"  # text and anything else, counted by its text


def _q(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def _unpivot(select: str, value: str) -> str:
    return f"UNPIVOT (SELECT {select} FROM latest) ON COLUMNS(*) INTO NAME feature VALUE {value}"


def _distribution_sql(name: str, kinds: dict[str, Kind], k: int) -> str:
    """One query of rows (part, feature, label, bin, n, lo, hi) for every feature; ``lo`` and
    ``hi`` are the k-th smallest and k-th largest value of a number or year feature."""
    numbers = [
        f"{'year(' + _q(c) + ')' if kind == 'year' else _q(c)}::DOUBLE AS {_q(c)}"
        for c, kind in kinds.items()
        if kind in ("number", "year")
    ]
    codes = [
        f"{_q(c)}::VARCHAR AS {_q(c)}" for c, kind in kinds.items() if kind in ("flag", "code")
    ]
    ctes = [
        f"latest AS (SELECT * FROM {FEATURES_SCHEMA}.{name} QUALIFY row_number() OVER "
        "(PARTITION BY patient_id ORDER BY event_timestamp DESC) = 1)"
    ]
    parts = ["SELECT 'rows', NULL, NULL, NULL, count(*), NULL, NULL FROM latest"]
    if kinds:
        present = ", ".join(f"count({_q(c)}) AS {_q(c)}" for c in kinds)
        parts.append(
            f"SELECT 'present', feature, NULL, NULL, n, NULL, NULL FROM ({_unpivot(present, 'n')})"
        )
    if numbers:
        ctes += _bin_ctes(_unpivot(", ".join(numbers), "x"), k)
        parts.append(
            # numpy.histogram's fix-up: the division may land one bin off within ~1 ULP of an
            # edge, so the value is compared with the edges linspace computes (i * step + low)
            "SELECT 'bin', feature, NULL, CASE WHEN x < i * step + low THEN i - 1 "
            f"WHEN i < {BINS - 1} AND x >= (i + 1) * step + low THEN i + 1 ELSE i END, "
            "count(*), lo, hi FROM guessed GROUP BY ALL"
        )
    if codes:
        ctes.append(f"codes AS ({_unpivot(', '.join(codes), 'label')})")
        ctes.append("code_counts AS (SELECT feature, label, count(*) AS n FROM codes GROUP BY ALL)")
        parts.append(
            # only a label of k or more patients is named: a rarer one would point at them
            f"SELECT 'code', feature, label, NULL, n, NULL, NULL FROM code_counts WHERE n >= {k} "
            "QUALIFY row_number() OVER "
            f"(PARTITION BY feature ORDER BY n DESC, label) <= {TOP_CODES}"
        )
        parts.append(
            # the patients of the rarer labels, as one count (drawn only when it is k or more)
            f"SELECT 'rare', feature, NULL, NULL, sum(n), NULL, NULL FROM code_counts "
            f"WHERE n < {k} GROUP BY feature"
        )
    return f"WITH {', '.join(ctes)} " + " UNION ALL ".join(parts)


def _bin_ctes(values: str, k: int) -> list[str]:
    """Each finite value, clipped to the k-th smallest and k-th largest value of its feature,
    with its bin guess ``i``, as numpy.histogram computes it over the clipped values."""
    return [
        f"numbers AS (SELECT * FROM ({values}) WHERE isfinite(x))",
        "ranked AS (SELECT feature, x, row_number() OVER (PARTITION BY feature ORDER BY x) AS r, "
        "count(*) OVER (PARTITION BY feature) AS n FROM numbers)",
        # top- and bottom-coding: the range runs from the k-th smallest to the k-th largest
        # value, so an end of the axis is never a value fewer than k patients reach (min and
        # max are one patient's own values). With fewer than 2k values the k smallest and the k
        # largest overlap, and the feature gets no range (no histogram)
        f"ranges AS (SELECT feature, max(x) FILTER (r = {k}) AS lo, "
        f"max(x) FILTER (r = n - {k} + 1) AS hi FROM ranked WHERE n >= {2 * k} GROUP BY feature)",
        # numpy widens a single-valued range by 0.5 each side
        "bounds AS (SELECT feature, lo, hi, CASE WHEN lo = hi THEN lo - 0.5 ELSE lo END AS low, "
        "CASE WHEN lo = hi THEN hi + 0.5 ELSE hi END AS high FROM ranges)",
        # a value beyond the range is counted at its end: in the first or the last bin
        "clipped AS (SELECT feature, greatest(lo, least(x, hi)) AS x, lo, hi, low, high "
        "FROM numbers JOIN bounds USING (feature))",
        f"guessed AS (SELECT feature, x, lo, hi, low, high, (high - low) / {BINS} AS step, "
        f"least(trunc((x - low) / (high - low) * {BINS}), {BINS - 1})::INTEGER AS i "
        "FROM clipped)",
    ]


def distributions(
    con: duckdb.DuckDBPyConnection, name: str, k: int = DEFAULT_K
) -> list[Distribution]:
    """Every feature's distribution over the latest rows of ``features.<name>``, showing no
    group of fewer than ``k`` patients (see :class:`Distribution`)."""
    kinds = feature_kinds(con, name)
    result = con.execute(_distribution_sql(name, kinds, k)).fetchall()
    rows = next(int(n) for part, *_, n, _, _ in result if part == "rows")
    present = {f: int(n) for part, f, _, _, n, _, _ in result if part == "present"}
    bins: dict[str, list[int]] = {f: [0] * BINS for f in kinds}
    bounds: dict[str, tuple[float, float]] = {}
    labelled: dict[str, list[tuple[str, int]]] = {f: [] for f in kinds}
    rare: dict[str, int] = {}
    for part, feature, label, bin_, n, lo, hi in result:
        if part == "bin":
            bins[feature][bin_] = int(n)
            bounds[feature] = (float(lo), float(hi))
        elif part == "code":
            labelled[feature].append((str(label), int(n)))
        elif part == "rare":
            rare[feature] = int(n)
    out = []
    for feature, kind in kinds.items():
        seen = present[feature]
        if kind in ("number", "year"):
            lo, hi = bounds.get(feature, (0.0, 1.0))
            single = feature in bounds and lo == hi
            # numpy widens a single-valued range by 0.5 each side (as the query's bins did)
            low, high = (lo - 0.5, hi + 0.5) if single else (lo, hi)
            counts = _shown(bins[feature], seen, k) if feature in bounds else ()
            out.append(Distribution(feature, kind, rows, seen, counts, (), low, high, k, single))
        elif kind == "flag":
            named = dict(labelled[feature])
            # a value missing from the named ones is 0, or under k when there are rarer ones
            # (which of the two is not known then, so both are hidden below)
            flags = [named.get(f, None if rare.get(feature) else 0) for f in FLAG_LABELS]
            counts = _shown(flags, seen, k)
            out.append(Distribution(feature, kind, rows, seen, counts, FLAG_LABELS, k=k))
        else:
            pairs = sorted(labelled[feature], key=lambda p: (-p[1], p[0]))
            if rare.get(feature):
                pairs.append((f"other (<{k})", rare[feature]))
            labels = tuple(p[0] for p in pairs)
            counts = _shown([p[1] for p in pairs], seen, k)
            out.append(Distribution(feature, kind, rows, seen, counts, labels, k=k))
    return out


def _shown(counts: list[int] | list[int | None], present: int, k: int) -> tuple[int | None, ...]:
    """``counts`` as a panel shows them: a count under ``k`` (but not 0) hidden (None), and then,
    while the patients the shown counts leave out of ``present`` are fewer than ``k`` (but not
    0), the smallest shown count hidden too (the last on a tie): ``present`` can be told from
    the panel's null share and the table's patient count, and the hidden total would be that
    difference. A count hidden that way is k or more, so one is enough."""
    shown = [None if n is None or 0 < n < k else n for n in counts]
    while 0 < present - sum(n or 0 for n in shown) < k:
        visible = [i for i, n in enumerate(shown) if n]
        if not visible:
            break  # all hidden; the title does not give a present count under k either
        shown[min(visible, key=lambda i: (shown[i] or 0, -i))] = None
    return tuple(shown)


@dataclass(frozen=True)
class _Box:
    """A panel's plot area in figure inches."""

    x: float
    y: float
    w: float
    h: float


def _palette() -> list[int]:
    """Index ``i`` is the grey ``(i, i, i)``, except index 0, the bars' blue, and index 1,
    black. Black is drawn as index 1, so antialiased text, blended between white (index 255)
    and black, lands on the greys between them, never on the blue (no text is drawn over a
    bar)."""
    blue = tuple(int(BLUE[i : i + 2], 16) for i in (1, 3, 5))
    return [*blue, 0, 0, 0, *(g for g in range(2, 256) for _ in range(3))]


_WHITE, _BLACK = 255, 1
_INK = {BLUE: 0, GREY: int(GREY[1:3], 16)}  # GREY is a grey: its own level of the ramp
# matplotlib's ha/va as Pillow anchors. matplotlib aligns a text's layout box, the font's
# ascender line on top and its descender line at the bottom, so a label sits the same way
# whatever its letters ("true" beside "false")
_HA = {"left": "l", "center": "m", "right": "r"}
_VA = {"top": "a", "center": "m", "bottom": "d"}


class _Sketch:
    """Shapes in figure inches (y upward, as the layout is written) drawn straight onto a Pillow
    image of ``width`` x ``height`` inches at ``DPI``: bars without edges, 1 px black lines, text
    anchored like matplotlib's ``ha``/``va``.

    Pillow rather than a matplotlib Figure: the plot runs for every feature table after every
    batch, and matplotlib's text layout alone cost ~0.15-0.3 s a table, most of a refresh after
    a small batch; Pillow draws the same picture in ~10 ms. The image is a palette image (see
    ``_palette``): one byte a pixel and no PNG row filters, so the PNG is written ~4x faster than
    an RGB one. No global state is changed (the cached fonts and tick locators are only read),
    so it is safe in any thread of the run."""

    def __init__(self, width: float, height: float) -> None:
        self.height = height
        self.image = Image.new("P", (round(width * DPI), round(height * DPI)), _WHITE)
        self.image.putpalette(_palette())
        self.draw = ImageDraw.Draw(self.image)
        self.draw.fontmode = "L"  # antialiased: the palette's greys are the blend's levels
        self.lines: list[list[tuple[float, float]]] = []

    def _px(self, x: float, y: float) -> tuple[float, float]:
        return x * DPI, (self.height - y) * DPI

    def bar(self, x0: float, y0: float, x1: float, y1: float, color: str = BLUE) -> None:
        """The rectangle [x0, x1] x [y0, y1] (x0 <= x1, y0 <= y1) filled, each edge on its
        nearest pixel boundary: adjacent bars neither overlap nor leave a gap, and a bar less
        than half a pixel high (a share too small to see) is not drawn."""
        (left, bottom), (right, top) = self._px(x0, y0), self._px(x1, y1)
        left, top, right, bottom = round(left), round(top), round(right), round(bottom)
        if right > left and bottom > top:
            self.draw.rectangle((left, top, right - 1, bottom - 1), fill=_INK[color])

    def text(
        self, x: float, y: float, s: str, size: float = 6, ha: str = "center", va: str = "center"
    ) -> None:
        anchor = _HA[ha] + _VA[va]
        self.draw.text(self._px(x, y), s, fill=_BLACK, font=_font(size), anchor=anchor)

    def xtick(self, box: _Box, x: float, label: str) -> None:
        self.lines.append([(x, box.y), (x, box.y - 0.04)])
        self.text(x, box.y - 0.06, label, va="top")

    def ytick(self, box: _Box, y: float, label: str) -> None:
        self.lines.append([(box.x, y), (box.x - 0.04, y)])
        self.text(box.x - 0.06, y, label, ha="right", va="center")

    def finish(self) -> Image.Image:
        """The lines drawn over the bars (a frame is never hidden by a bar), and the image."""
        for points in self.lines:
            xy = [(round(px), round(py)) for px, py in (self._px(x, y) for x, y in points)]
            self.draw.line(xy, fill=_BLACK, width=1)
        return self.image

    def save(self, path: Path, text: dict[str, str] | None = None) -> None:
        """The PNG, with ``text`` in its text chunks; written to a temporary name and renamed,
        so a reader never sees half a file."""
        info = PngInfo()
        for key, value in (text or {}).items():
            info.add_text(key, value)
        image = self.finish()
        write_replacing(
            path, lambda tmp: image.save(tmp, format="PNG", compress_level=6, pnginfo=info)
        )


# fonts loaded by each thread: the plots of several tables are drawn side by side, and one
# FreeType face is not made to render in two threads at once
_THREAD_FONTS = threading.local()


def _font(points: float) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font (Aileron; no system font needed), ``points`` high on a
    ``DPI`` image, in whole pixels: at fractional sizes the hinted glyphs are spaced unevenly."""
    size = round(points * DPI / 72)
    fonts: dict[int, ImageFont.FreeTypeFont | ImageFont.ImageFont]
    fonts = _THREAD_FONTS.__dict__.setdefault("by_size", {})
    if size not in fonts:
        fonts[size] = ImageFont.load_default(size=size)
    return fonts[size]


def _ticks(low: float, high: float, count: int, integer: bool = True) -> list[float]:
    """Up to ``count`` + 1 round values within [low, high], as matplotlib's axes choose them."""
    values = _locator(count, integer).tick_values(low, high)
    slack = (high - low) * 1e-9
    return [float(v) for v in values if low - slack <= v <= high + slack]


@cache
def _locator(count: int, integer: bool) -> MaxNLocator:
    """One locator per setting (making one costs more than its ``tick_values``, which keeps no
    state, so a shared one is safe in any thread)."""
    return MaxNLocator(nbins=count, steps=[1, 2, 2.5, 5, 10], integer=integer)


def _label(value: float) -> str:
    return f"{value:g}"


def _draw_bins(sk: _Sketch, box: _Box, d: Distribution) -> None:
    """Histogram bars on the bin edges (a hidden count left empty), x ticks in the feature's
    unit, the ends marked as holding the values beyond them, y ticks in patients."""
    span = d.high - d.low
    pad = box.w * 0.04  # matplotlib's default axes margin, so end bars do not touch the frame

    def at_x(v: float) -> float:
        return box.x + pad + (v - d.low) / span * (box.w - 2 * pad)

    top = max(n or 0 for n in d.counts) * 1.05
    edges = d.edges
    for i, n in enumerate(d.counts):
        if n:
            sk.bar(at_x(edges[i]), box.y, at_x(edges[i + 1]), box.y + n / top * box.h)
    # whole-number bounds (years, counts, days) get whole-number ticks: no "1.5 encounters"
    whole = d.low.is_integer() and d.high.is_integer()
    ticks = _ticks(d.low, d.high, 4, integer=whole)
    if d.k > 1 and not d.single:
        # the ends hold every value beyond them: labelled so (the font has no ≤ and ≥), and
        # the round ticks kept clear of those wider labels
        ticks = [v for v in ticks if d.low + span * 0.2 < v < d.high - span * 0.2]
        sk.xtick(box, at_x(d.low), "<=" + _label(d.low))
        sk.xtick(box, at_x(d.high), ">=" + _label(d.high))
    for v in ticks:
        sk.xtick(box, at_x(v), _label(v))
    for v in _ticks(0, top, 4):
        sk.ytick(box, box.y + v / top * box.h, _label(v))


def _draw_flags(sk: _Sketch, box: _Box, d: Distribution) -> None:
    """The share of false and true among the present values, on a fixed 0..1 scale (drawn only
    when both are shown: either one's share gives the other)."""
    for i, (label, n, color) in enumerate(zip(d.labels, d.counts, (GREY, BLUE), strict=True)):
        left = box.x + box.w * (0.1 + 0.45 * i)
        if n is not None:
            sk.bar(left, box.y, left + box.w * 0.35, box.y + n / d.present * box.h, color)
        sk.xtick(box, left + box.w * 0.175, label)
    for v in (0.0, 0.5, 1.0):  # shares, so every flag panel reads on the same scale
        sk.ytick(box, box.y + v * box.h, _label(v))


def _draw_codes(sk: _Sketch, box: _Box, d: Distribution) -> None:
    """Horizontal bars of the most frequent codes, the most frequent on top (a hidden count's
    code named, its bar left empty)."""
    top = max(n or 0 for n in d.counts) * 1.05
    slot = box.h / max(len(d.labels), 4)  # a few codes keep bars of a readable height
    for i, (label, n) in enumerate(zip(d.labels, d.counts, strict=True)):
        y = box.y + box.h - (i + 1) * slot
        if n:
            sk.bar(box.x, y + slot * 0.1, box.x + n / top * box.w, y + slot * 0.9)
        sk.ytick(box, y + slot / 2, label if len(label) <= 10 else label[:9] + "…")
    for v in _ticks(0, top, 4):
        sk.xtick(box, box.x + v / top * box.w, _label(v))


def _title(d: Distribution) -> str:
    """The feature and its null share; a share that would give a count of fewer than k patients
    (with or without a value) says only that it is under k."""
    missing = d.rows - d.present
    if 0 < d.present < d.k:
        return f"{d.feature} (values: <{d.k} patients)"
    if 0 < missing < d.k:
        return f"{d.feature} (null: <{d.k} patients)"
    return f"{d.feature} (null {missing / d.rows if d.rows else 0.0:.0%})"


def _note(d: Distribution) -> str:
    """What the panel leaves out, under its x ticks (nothing when k is 1)."""
    if d.k <= 1:
        return ""
    if d.kind in ("number", "year") and d.counts and d.single:
        at = _label(d.low + 0.5)
        return f"values beyond {at} counted at {at}; bins of <{d.k} patients not shown"
    if d.kind in ("number", "year"):
        return f"bins of <{d.k} patients not shown"
    if d.kind == "flag":
        return f"both hidden when one is <{d.k} patients"
    return f"codes of <{d.k} patients: in other (<{d.k}) or not shown"


def _draw_panel(sk: _Sketch, box: _Box, d: Distribution) -> None:
    sk.text(box.x + box.w / 2, box.y + box.h + 0.06, _title(d), size=8, va="bottom")
    x0, y0, x1, y1 = box.x, box.y, box.x + box.w, box.y + box.h
    sk.lines.append([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)])
    middle = (box.x + box.w / 2, box.y + box.h / 2)
    if not d.present:
        sk.text(*middle, "no values")
        return
    if not d.counts:  # a number or year feature of fewer than 2k values
        sk.text(*middle, f"fewer than {2 * d.k} values: not drawn")
        return
    if not any(d.counts):
        sk.text(*middle, f"counts of <{d.k} patients not shown")
    elif d.kind in ("number", "year"):
        _draw_bins(sk, box, d)
    elif d.kind == "flag":
        _draw_flags(sk, box, d)
    else:
        _draw_codes(sk, box, d)
    if note := _note(d):
        sk.text(box.x + box.w / 2, box.y - 0.19, note, size=NOTE_POINTS, va="top")


# the PNG text chunk holding what a plot was drawn from; bump the version when the drawing
# changes, so that every plot is drawn again
PLOT_DIGEST_KEY = "ehr-distributions"
_PLOT_VERSION = "2"  # 2: no group of fewer than k patients shown


def _plot_digest(name: str, found: list[Distribution]) -> str:
    """A digest of what the plot shows: the table's name and, per feature, its title and its
    shown counts, labels and bin edges (all aggregates). Only what is drawn: the PNG carries
    the digest, and one over a hidden count (the exact patients with a value, when the title
    says only "<k") would give that count to anyone hashing each guess."""
    shown = [
        (d.feature, d.kind, _title(d), d.counts, d.labels, d.low, d.high, d.k, d.single)
        for d in found
    ]
    return hashlib.sha256(repr((_PLOT_VERSION, name, shown)).encode()).hexdigest()


def _drawn_from(path: Path) -> str | None:
    """The digest a PNG written by :func:`plot_distributions` records (None when there is no
    readable file); only the PNG's header chunks are read."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {})
            found = text.get(PLOT_DIGEST_KEY)
            return str(found) if found is not None else None
    except (OSError, SyntaxError, ValueError):
        return None


def plot_distributions(
    con: duckdb.DuckDBPyConnection, name: str, path: Path, k: int = DEFAULT_K
) -> Path:
    """One histogram (bars for flags and codes) per feature of the latest rows, as a PNG,
    showing no group of fewer than ``k`` patients (the release's k); drawn only when the
    distributions differ from those the PNG at ``path`` was drawn from (a refresh whose new
    rows leave them as they were keeps the file)."""
    found = distributions(con, name, k)
    digest = _plot_digest(name, found)
    if _drawn_from(path) == digest:
        return path
    rows = max(1, -(-len(found) // GRID_COLUMNS))
    cell_w, cell_h = CELL_INCHES
    height = rows * cell_h + TITLE_INCHES
    sk = _Sketch(GRID_COLUMNS * cell_w, height)
    for i, d in enumerate(found):
        row, col = divmod(i, GRID_COLUMNS)
        cell_y = height - TITLE_INCHES - (row + 1) * cell_h
        _draw_panel(sk, _Box(col * cell_w + 0.55, cell_y + 0.35, cell_w - 0.75, 1.4), d)
    if not found:
        sk.text(GRID_COLUMNS * cell_w / 2, cell_h / 2, "(no features)", size=8)
    title = f"{name}: each patient's latest values"
    sk.text(GRID_COLUMNS * cell_w / 2, height - 0.1, title, size=10, va="top")
    path.parent.mkdir(parents=True, exist_ok=True)
    sk.save(path, {PLOT_DIGEST_KEY: digest})
    return path
