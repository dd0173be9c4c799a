"""The usage page's HTML: plain f-strings, every value escaped, no script, no outside resource.

Layout is fluid (one column on a phone, wide tables scroll sideways) with inline CSS, which the
Content-Security-Policy admits by its hash only. Usage tables carry each figure's counter name in
`data-counter` and its exact value in `data-value`, so a machine can check what people read.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from html import escape
from urllib.parse import urlencode

from proxy.ui_charts import Series, bar_chart

# (counter, heading); `hit_ratio` is derived from requests and cache_hits.
_COLUMNS = (
    ("requests", "Requests"),
    ("cache_hits", "Cache hits"),
    ("hit_ratio", "Hit ratio"),
    ("uploads", "Uploads"),
    ("upload_bytes", "Uploaded"),
    ("downloads", "Downloads"),
    ("download_bytes", "Downloaded"),
    ("deletes", "Deletes"),
    ("errors", "Errors"),
)
_BYTE_COUNTERS = frozenset({"upload_bytes", "download_bytes"})
_CSS = """
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#111827}
body{background:#f9fafb}
header{display:flex;flex-wrap:wrap;gap:.5rem 1rem;align-items:center;padding:.6rem 1rem}
header{background:#1f2937;color:#fff}
header .who{margin-left:auto}
header form{margin:0}
main{max-width:72rem;margin:0 auto;padding:1rem}
h1{font-size:1.4rem;margin:.2rem 0 .8rem}
h2{font-size:1.1rem;margin:1.6rem 0 .5rem}
section h2{margin-top:0}
section,.card{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:.8rem;margin:.8rem 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .55rem;border-bottom:1px solid #e5e7eb;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
td.name{white-space:normal;word-break:break-all}
tfoot th,tfoot td{font-weight:600;border-top:2px solid #9ca3af}
form.range{display:flex;flex-wrap:wrap;gap:.5rem;align-items:end}
label{display:flex;flex-direction:column;font-size:.85rem}
input,button{font:inherit;padding:.35rem .5rem}
button{cursor:pointer}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(18rem,1fr));gap:.8rem}
figure{margin:0}
figcaption{font-weight:600;font-size:.95rem}
.message{background:#fef2f2;border:1px solid #fca5a5;padding:.6rem;border-radius:6px}
.login{max-width:24rem;margin:3rem auto}
.login input{width:100%}
.note{color:#4b5563;font-size:.9rem}
"""
# No script at all; the one inline style sheet by its hash; forms post to this origin only.
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; form-action 'self'; frame-ancestors 'none';"
    " base-uri 'none'"
)


@dataclass(frozen=True, slots=True)
class FileRow:
    name: str
    size_bytes: int | None
    created_at: str | None
    expires_at: str | None


@dataclass(frozen=True, slots=True)
class FilesPage:
    """One page of a team's files, or why it could not be read."""

    rows: tuple[FileRow, ...] = ()
    next_page: str | None = None
    first_page: bool = True
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StorageRow:
    """What a team holds against its quotas (issue 16's `storage` rows)."""

    tenant: str
    files: int
    bytes: int
    quota_bytes: int | None
    max_files: int | None


@dataclass(frozen=True, slots=True)
class TeamView:
    team: str
    since: date
    until: date
    days: Mapping[date, Mapping[str, int]]  # every day of the range, in order
    files: FilesPage | None  # None: the team is not configured (usage only)
    storage: StorageRow | None  # None: no storage source (or no row for the team); no section
    admin: bool  # viewed by the admin: links back, and keeps `team` in the range form


@dataclass(frozen=True, slots=True)
class AdminView:
    since: date
    until: date
    days: Mapping[date, Mapping[str, int]]  # all teams together
    teams: Mapping[str, Mapping[str, int]]  # team -> totals over the range
    storage: Mapping[str, StorageRow] | None  # None: no storage source; the columns are left out


def login_page(message: str | None = None) -> str:
    body = (
        '<div class="login card"><h1>Sign in</h1>'
        "<p class=\"note\">With your team's proxy key (your team's usage and files) or the admin key.</p>"
        f'{_alert(message)}<form method="post" action="/ui/login">'
        '<label>Key <input type="password" name="key" autocomplete="current-password" required autofocus>'
        '</label><p><button type="submit">Sign in</button></p></form>'
        # The session cookie is SameSite=Strict: a link from another site arrives without it.
        '<p class="note">Signed in already, and sent here by a link? <a href="/ui/">Open the usage page</a>.'
        "</p></div>"
    )
    return _layout("Sign in", None, body)


def error_page(message: str, signed_in_as: str | None) -> str:
    body = f'{_alert(message)}<p><a href="/ui/">Back to the usage page</a></p>'
    return _layout("Usage", signed_in_as, body)


def team_page(view: TeamView, signed_in_as: str, message: str | None = None) -> str:
    totals = _sum(view.days.values())
    everyone = escape("/ui/?" + urlencode(_range_query(view.since, view.until)))
    parts = [
        f'<p><a href="{everyone}">&larr; All teams</a></p>' if view.admin else "",
        f"<h1>Team {escape(view.team)}</h1>",
        _range_form(view.since, view.until, view.team if view.admin else None),
        _alert(message),
        _charts(view.days),
        "<h2>Usage per day (UTC)</h2>",
        _usage_table(view.days, totals),
    ]
    if view.storage is not None:
        parts.append(_storage_section(view.storage))
    if view.files is not None:
        parts.append(_files_section(view.files, view))
    return _layout(f"Team {view.team}", signed_in_as, "".join(parts))


def admin_page(view: AdminView, signed_in_as: str, message: str | None = None) -> str:
    totals = _sum(view.teams.values())
    hits, requests = totals.get("cache_hits", 0), totals.get("requests", 0)
    summary = (
        "<section><p><strong>Cache hit ratio:</strong> "
        f'<span data-summary="hit_ratio">{_ratio(hits, requests)}</span> of '
        f"{requests:,} requests were answered from the proxy's cache.</p>"
        "<p><strong>Upstream requests saved:</strong> "
        f'<span data-summary="saved" data-value="{hits}">{hits:,}</span>: every cache hit is one request '
        "Anthropic did not get (saved = cache hits).</p></section>"
    )
    parts = [
        "<h1>All teams</h1>",
        _range_form(view.since, view.until, None),
        _alert(message),
        summary,
        _charts(view.days),
        "<h2>Usage per team</h2>",
        _teams_table(view, totals),
    ]
    return _layout("All teams", signed_in_as, "".join(parts))


def _layout(title: str, signed_in_as: str | None, body: str) -> str:
    who = ""
    if signed_in_as is not None:
        who = (
            f'<span class="who">Signed in as {escape(signed_in_as)}</span>'
            '<form method="post" action="/ui/logout"><button type="submit">Sign out</button></form>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · files-proxy</title><style>{_CSS}</style></head>"
        f"<body><header><strong>files-proxy usage</strong>{who}</header><main>{body}</main></body></html>"
    )


def _alert(message: str | None) -> str:
    return f'<p class="message" role="alert">{escape(message)}</p>' if message else ""


def _range_form(since: date, until: date, team: str | None) -> str:
    hidden = f'<input type="hidden" name="team" value="{escape(team)}">' if team is not None else ""
    return (
        f'<form class="range" method="get" action="/ui/">{hidden}'
        f'<label>From <input type="date" name="since" value="{since.isoformat()}"></label>'
        f'<label>To <input type="date" name="until" value="{until.isoformat()}"></label>'
        '<button type="submit">Show</button></form>'
    )


def _charts(days: Mapping[date, Mapping[str, int]]) -> str:
    dates = list(days)

    def values(counter: str) -> tuple[int, ...]:
        return tuple(days[day].get(counter, 0) for day in dates)

    requests = bar_chart(
        "Requests per day",
        dates,
        [
            Series("requests", values("requests"), "#2563eb"),
            Series("cache hits", values("cache_hits"), "#16a34a"),
        ],
        shown=lambda n: f"{n:,}",
    )
    transferred = bar_chart(
        "Bytes per day",
        dates,
        [
            Series("uploaded", values("upload_bytes"), "#9333ea"),
            Series("downloaded", values("download_bytes"), "#ea580c"),
        ],
        shown=_size,
    )
    cards = "".join(
        f'<figure class="card"><figcaption>{caption}</figcaption>{chart}</figure>'
        for caption, chart in (("Requests per day", requests), ("Bytes per day", transferred))
    )
    return f'<div class="charts">{cards}</div>'


def _usage_table(days: Mapping[date, Mapping[str, int]], totals: Mapping[str, int]) -> str:
    head = "".join(f'<th scope="col">{heading}</th>' for _, heading in _COLUMNS)
    rows = "".join(
        f'<tr data-day="{day.isoformat()}"><th scope="row">{day.isoformat()}</th>{_cells(counts)}</tr>'
        for day, counts in days.items()
    )
    return (
        f'<div class="scroll"><table class="usage"><thead><tr><th scope="col">Day</th>{head}</tr></thead>'
        f'<tbody>{rows}</tbody><tfoot><tr data-row="totals"><th scope="row">Total</th>{_cells(totals)}</tr>'
        "</tfoot></table></div>"
    )


def _teams_table(view: AdminView, totals: Mapping[str, int]) -> str:
    head = "".join(f'<th scope="col">{heading}</th>' for _, heading in _COLUMNS)
    if view.storage is not None:
        head += '<th scope="col">Files held</th><th scope="col">Storage</th>'
    query = _range_query(view.since, view.until)
    rows = []
    for team, counts in view.teams.items():
        link = escape("/ui/?" + urlencode({"team": team, **query}))
        storage = "" if view.storage is None else _storage_cells(view.storage.get(team))
        rows.append(
            f'<tr data-team="{escape(team)}"><th scope="row"><a href="{link}">{escape(team)}</a></th>'
            f"{_cells(counts)}{storage}</tr>"
        )
    storage_total = "" if view.storage is None else _storage_cells(_storage_sum(view.storage.values()))
    return (
        f'<div class="scroll"><table class="usage"><thead><tr><th scope="col">Team</th>{head}</tr></thead>'
        f'<tbody>{"".join(rows)}</tbody><tfoot><tr data-row="totals"><th scope="row">Total</th>'
        f"{_cells(totals)}{storage_total}</tr></tfoot></table></div>"
    )


def _cells(counts: Mapping[str, int]) -> str:
    cells = []
    for counter, _ in _COLUMNS:
        if counter == "hit_ratio":
            requests, hits = counts.get("requests", 0), counts.get("cache_hits", 0)
            exact = f"{hits / requests:.4f}" if requests else ""
            cells.append(f'<td data-counter="hit_ratio" data-value="{exact}">{_ratio(hits, requests)}</td>')
            continue
        value = counts.get(counter, 0)
        shown = _size(value) if counter in _BYTE_COUNTERS else f"{value:,}"
        cells.append(f'<td data-counter="{counter}" data-value="{value}">{shown}</td>')
    return "".join(cells)


def _storage_section(row: StorageRow) -> str:
    return (
        '<section data-section="storage"><h2>Storage</h2><div class="scroll"><table><thead><tr>'
        '<th scope="col">Team</th><th scope="col">Files held</th><th scope="col">Storage</th></tr></thead>'
        f'<tbody><tr><th scope="row">{escape(row.tenant)}</th>{_storage_cells(row)}</tr></tbody></table>'
        "</div></section>"
    )


def _storage_cells(row: StorageRow | None) -> str:
    if row is None:
        return '<td data-counter="storage_files"></td><td data-counter="storage_bytes"></td>'
    files = f"{row.files:,}" + ("" if row.max_files is None else f" of {row.max_files:,}")
    held = _size(row.bytes) + ("" if row.quota_bytes is None else f" of {_size(row.quota_bytes)}")
    return (
        f'<td data-counter="storage_files" data-value="{row.files}">{files}</td>'
        f'<td data-counter="storage_bytes" data-value="{row.bytes}">{held}</td>'
    )


def _storage_sum(rows: Iterable[StorageRow]) -> StorageRow:
    held = list(rows)
    return StorageRow("", sum(r.files for r in held), sum(r.bytes for r in held), None, None)


def _files_section(files: FilesPage, view: TeamView) -> str:
    if files.error is not None:
        return f'<section data-section="files"><h2>Files</h2>{_alert(files.error)}</section>'
    rows = "".join(
        f'<tr><td class="name">{escape(f.name)}</td>'
        f"<td>{'' if f.size_bytes is None else _size(f.size_bytes)}</td>"
        f"<td>{_when(f.created_at)}</td><td>{_when(f.expires_at) or 'never'}</td></tr>"
        for f in files.rows
    )
    if not files.rows:
        rows = '<tr><td colspan="4">No files.</td></tr>'
    query = {**({"team": view.team} if view.admin else {}), **_range_query(view.since, view.until)}
    links = []
    if not files.first_page:
        links.append(f'<a href="{escape("/ui/?" + urlencode(query))}#files">First page</a>')
    if files.next_page is not None:
        later = escape("/ui/?" + urlencode({**query, "page": files.next_page}))
        links.append(f'<a rel="next" href="{later}#files">Next page</a>')
    pager = f"<p>{' · '.join(links)}</p>" if links else ""
    return (
        '<section id="files" data-section="files"><h2>Files</h2><div class="scroll"><table class="files">'
        '<thead><tr><th scope="col">Name</th><th scope="col">Size</th><th scope="col">Created (UTC)</th>'
        f'<th scope="col">Expires (UTC)</th></tr></thead><tbody>{rows}</tbody></table></div>'
        f"{pager}</section>"
    )


def _range_query(since: date, until: date) -> dict[str, str]:
    return {"since": since.isoformat(), "until": until.isoformat()}


def _sum(rows: Iterable[Mapping[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for counts in rows:
        for counter, value in counts.items():
            totals[counter] = totals.get(counter, 0) + value
    return totals


def _ratio(hits: int, requests: int) -> str:
    return f"{100 * hits / requests:.1f}%" if requests else "–"


def _size(n: int) -> str:
    """Bytes for people, in binary units."""
    if n < 1024:
        return f"{n:,} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _when(text: str | None) -> str:
    """An RFC 3339 time from upstream as `YYYY-MM-DD HH:MM` (UTC); anything else shown escaped."""
    if not text:
        return ""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return escape(text)
    return (moment.astimezone(UTC) if moment.tzinfo else moment).strftime("%Y-%m-%d %H:%M")
