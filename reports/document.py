"""A report as a list of blocks, rendered twice: Markdown (images linked as plots/*.png) and one
self-contained HTML file (images embedded as base64 data URIs, inline CSS, no script, nothing
fetched from the network), so report.html opens from disk anywhere."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; background: #fff; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; }
p.note { color: #555; font-size: 0.9em; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    id: str = ""
    left: int = 1  # leading text columns, left-aligned; the rest are numbers, right-aligned


@dataclass
class Document:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def para(self, text: str, note: bool = False) -> None:
        self.blocks.append(("note" if note else "p", text))

    def bullets(self, items: list[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, header: list[str], rows: list[list[str]], id: str = "", left: int = 1
              ) -> None:
        self.blocks.append(("table", Table(header, [[str(c) for c in r] for r in rows], id,
                                           left)))

    def image(self, path: Path, root: Path, alt: str) -> None:
        """A PNG under `root` (the report's directory)."""
        self.blocks.append(("img", Path(path).relative_to(root).as_posix(), alt))

    def code(self, text: str) -> None:
        self.blocks.append(("pre", text))

    def link(self, text: str, target: str) -> None:
        self.blocks.append(("link", text, target))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, *args in self.blocks:
            if kind == "h2":
                out += [f"## {args[0]}", ""]
            elif kind in ("p", "note"):
                out += [args[0] if kind == "p" else f"*{args[0]}*", ""]
            elif kind == "ul":
                out += [f"- {item}" for item in args[0]] + [""]
            elif kind == "table":
                t = args[0]
                out.append("| " + " | ".join(_md_cell(c) for c in t.header) + " |")
                out.append("|" + "|".join("---" if i < t.left else "---:"
                                          for i in range(len(t.header))) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in t.rows]
                out.append("")
            elif kind == "img":
                out += [f"![{args[1]}]({args[0]})", ""]
            elif kind == "pre":
                out += ["```", args[0].rstrip("\n"), "```", ""]
            elif kind == "link":
                out += [f"[{args[0]}]({args[1]})", ""]
        return "\n".join(out)

    def html(self, root: Path) -> str:
        esc = html.escape
        out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
               f"<title>{esc(self.title)}</title>", f"<style>{CSS}</style></head><body>",
               f"<h1>{esc(self.title)}</h1>"]
        for kind, *args in self.blocks:
            if kind == "h2":
                out.append(f"<h2>{esc(args[0])}</h2>")
            elif kind == "p":
                out.append(f"<p>{esc(args[0])}</p>")
            elif kind == "note":
                out.append(f'<p class="note">{esc(args[0])}</p>')
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in args[0]) + "</ul>")
            elif kind == "table":
                t = args[0]
                ident = f' id="{esc(t.id)}"' if t.id else ""
                cls = [' class="text"' if i < t.left else "" for i in range(len(t.header))]
                out.append(f"<table{ident}><thead><tr>"
                           + "".join(f"<th{a}>{esc(c)}</th>" for a, c in zip(cls, t.header))
                           + "</tr></thead><tbody>")
                out += ["<tr>" + "".join(f"<td{a}>{esc(c)}</td>" for a, c in zip(cls, r))
                        + "</tr>" for r in t.rows]
                out.append("</tbody></table>")
            elif kind == "img":
                data = base64.b64encode((Path(root) / args[0]).read_bytes()).decode()
                out.append(f'<p><img alt="{esc(args[1])}" src="data:image/png;base64,{data}">'
                           f"</p>")
            elif kind == "pre":
                out.append(f"<pre>{esc(args[0])}</pre>")
            elif kind == "link":
                # a sibling report on disk: relative, so the folder can move as a whole
                out.append(f'<p><a href="{esc(args[1])}">{esc(args[0])}</a></p>')
        out.append("</body></html>")
        return "\n".join(out)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
