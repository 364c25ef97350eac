"""Result cells, rows and the side-by-side table (plain text and Markdown)."""

from dataclasses import dataclass, field

# "go" (the Go program's server + client) is measured only when BACKHAUL_GO names its binary;
# "2 clients" (one server in balance mode, two clients of ours) only by the `clients` measurement;
# "go server" (the Go server, our client) and "go client" (our server, the Go client) only where a
# row pairs our side with the Go program's.
PATHS = ("direct", "relay", "tunnel", "go", "go server", "go client", "2 clients")


@dataclass
class Cell:
    """One measured value of one path, or why there is none."""

    value: float | None = None
    extra: str = ""  # shown after the value, e.g. "0 fail"
    text: str | None = None  # shown as is instead of the value (info rows, "-", "n/a")

    @classmethod
    def missing(cls, why: str) -> "Cell":
        return cls(text=why)


@dataclass
class Row:
    """A measurement across the paths.

    kind says how ratios read: "higher" and "lower" are to direct (lower also
    shows the added amount), "cost" is to the relay (direct moves no bytes
    through a middle process), "info" shows text only.
    """

    name: str
    kind: str
    cells: dict[str, Cell] = field(default_factory=dict)
    fmt: str = "{:,.0f}"
    unit: str = ""


def _value(row: Row, cell: Cell) -> str:
    text = row.fmt.format(cell.value)
    return f"{text}, {cell.extra}" if cell.extra else text


def format_cell(row: Row, path: str) -> str:
    """Text of one cell: value, then the ratio (and added amount) against its baseline."""
    cell = row.cells.get(path, Cell.missing("-"))
    if cell.text is not None or cell.value is None:
        return cell.text or "-"
    base_path = "relay" if row.kind == "cost" else "direct"
    base = row.cells.get(base_path)
    if row.kind == "info" or path == base_path or base is None or not base.value:
        return _value(row, cell)
    ratio = cell.value / base.value
    suffix = " relay" if row.kind == "cost" else ""
    if row.kind == "lower":
        added = cell.value - base.value
        sign = "+" if added >= 0 else "-"
        inner = f"{sign}{row.fmt.format(abs(added))}{row.unit}, {ratio:.2f}x"
    else:
        inner = f"{ratio:.2f}x{suffix}"
    value = row.fmt.format(cell.value)
    extra = f", {cell.extra}" if cell.extra else ""
    return f"{value} ({inner}){extra}"


def columns(rows: list[Row]) -> list[str]:
    """The paths that any row has a cell for, in table order (direct and tunnel always)."""
    return [p for p in PATHS if p in ("direct", "tunnel") or any(p in row.cells for row in rows)]


def headers(paths: list[str]) -> list[str]:
    return ["measurement"] + [p if p == "direct" else f"{p} (x)" for p in paths]


def table_rows(rows: list[Row], paths: list[str]) -> list[list[str]]:
    return [[row.name] + [format_cell(row, p) for p in paths] for row in rows]


def render_text(rows: list[Row]) -> str:
    """Aligned plain-text table."""
    paths = columns(rows)
    body = [headers(paths), *table_rows(rows, paths)]
    widths = [max(len(line[i]) for line in body) for i in range(len(body[0]))]
    return "\n".join("  ".join(col.ljust(w) for col, w in zip(line, widths, strict=True)).rstrip() for line in body)


def render_markdown(rows: list[Row], header_lines: list[str], notes: list[str]) -> str:
    """Markdown document: machine lines, the table, then notes."""
    paths = columns(rows)
    out = [f"- {line}" for line in header_lines] + [""]
    out.append("| " + " | ".join(headers(paths)) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * len(paths)) + "|")
    out += ["| " + " | ".join(line) + " |" for line in table_rows(rows, paths)]
    if notes:
        out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(out) + "\n"
