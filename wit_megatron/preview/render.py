"""Sample views and dataset summaries as text for a terminal, TSV, or one self-contained HTML page.

Each target token is shown with its role and weight; a record starts with its context token (the
input before its first target, e.g. BOS or a template token: never trained on) and a record line;
padding is one line. Special and template tokens (EOS, <|im_start|>, ...) are shown by name in
brackets, a newline as ↵ followed by a line break, so nothing the model is trained on is invisible.

    ansi   background colour per role, alternating shades mark token boundaries, a tag at each change
           of (role, weight); weight-0 targets dimmed
    plain  the same text with a marker «role weight» at each change of (role, weight) (no colours:
           what a pipe or a file gets)
    tsv    one line per position: position, document, record, position_id, input_id, target_id, role,
           weight (float32, 9 significant digits), target text; padding positions with role "pad"
    html   one <span class="tok r-ROLE" data-w=.. data-id=..> per target; counts per role filled in
           by the page's own script from those spans
"""

from __future__ import annotations

import html
from typing import Iterable

from wit_megatron.preview.summary import DatasetSummary
from wit_megatron.preview.view import ROLE_NAMES, SampleView

# role -> (ANSI background of even tokens, of odd tokens, foreground; HTML colour)
STYLES = {
    "prompt": ("48;5;24", "48;5;25", "97", "#cfe3ff"),
    "response": ("48;5;22", "48;5;28", "97", "#c8f0c8"),
    "system": ("48;5;90", "48;5;91", "97", "#f0d0f0"),
    "user": ("48;5;30", "48;5;31", "97", "#c8eef0"),
    "tool": ("48;5;94", "48;5;130", "97", "#f5e0c0"),
}
CONTEXT_HTML = "#e0e0e0"
RESET = "\033[0m"


class TokenText:
    """How a token id is shown: its decoded text, special tokens by name in brackets."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self.special |= {i for i, t in added.items() if getattr(t, "special", False)}
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            if token_id in self.special:
                text = f"[{self.tokenizer.convert_ids_to_tokens(token_id)}]"
            else:
                text = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
            self._cache[token_id] = text
        return text

    @staticmethod
    def visible(text: str) -> str:
        """For one line of a terminal or TSV: newline and tab written as marks."""
        return text.replace("\r", "␍").replace("\n", "↵").replace("\t", "→")


def _weight(w: float) -> str:
    return f"{w:g}"


def _header(view: SampleView) -> str:
    counts = view.counts()
    per_role = ", ".join(f"{name} {c['targets']} (weighted {c['weighted']})" for name, c in counts.items())
    padding = view.seq_length - view.targets
    return (f"=== {view.title}: {len(view.segments)} record(s), {view.targets} targets ({per_role}), "
            f"{padding} padding of {view.seq_length}")


def terminal(view: SampleView, text: TokenText, colour: bool) -> str:
    ids = view.tensors["labels"].tolist()
    weights = view.weights.tolist()
    out = [_header(view)]
    for seg in view.segments:
        out.append(f"\n--- record {seg.record} (document {seg.document}, positions {seg.start}-{seg.end - 1}, "
                   f"{seg.end - seg.start} targets)\n")
        context = text(seg.context_id)
        out.append(f"\033[2m{TokenText.visible(context)}{RESET}" if colour else f"«context» {TokenText.visible(context)}")
        current = None
        for p in range(seg.start, seg.end):
            role, w = ROLE_NAMES[int(view.roles[p])], weights[p]
            tag = f"«{role} {_weight(w)}»"
            token = text(ids[p])
            shown = token.replace("\n", "↵\n").replace("\t", "→")
            if colour:
                even, odd, fg, _ = STYLES[role]
                if (role, w) != current:
                    out.append(f"\033[1;{fg};{even}m{tag}{RESET}")
                dim = ";2" if w == 0 else ""
                out.append(f"\033[{fg};{even if p % 2 == 0 else odd}{dim}m{shown}{RESET}")
            else:
                if (role, w) != current:
                    out.append(tag)
                out.append(shown)
            current = (role, w)
        out.append("\n")
    padding = view.seq_length - view.targets
    if padding:
        out.append(f"--- padding: {padding} positions (weight 0)\n")
    return "".join(out)


def tsv(view: SampleView, text: TokenText) -> str:
    t = view.tensors
    docs = t["document_ids"].tolist() if "document_ids" in t else None
    record_of = {}
    for seg in view.segments:
        for p in range(seg.start, seg.end):
            record_of[p] = (seg.document, seg.record)
    lines = [f"# {view.title}", "position\tdocument\trecord\tposition_id\tinput_id\ttarget_id\trole\tweight\ttarget_text"]
    for p, (inp, tgt, pos, w, role) in enumerate(zip(t["tokens"].tolist(), t["labels"].tolist(), t["position_ids"].tolist(),
                                                     view.weights.tolist(), view.roles.tolist())):
        document, record = record_of.get(p, (-1, -1))
        if docs is not None and docs[p] != document:
            raise ValueError(f"{view.title}: position {p} belongs to document {docs[p]} in the sample, {document} by its records")
        name = ROLE_NAMES[role] if role >= 0 else "pad"
        shown = TokenText.visible(text(tgt)) if role >= 0 else ""
        lines.append(f"{p}\t{document}\t{record}\t{pos}\t{inp}\t{tgt}\t{name}\t{w:.9g}\t{shown}")
    return "\n".join(lines) + "\n"


def summary_text(summary: DatasetSummary, max_named: int = 20) -> str:
    s = summary
    roles = ", ".join(f"{name} {s.tokens_per_role[name]} (targets {s.targets_per_role[name]}, λ {_weight(s.weight_per_role[name])})"
                      for name in s.tokens_per_role)
    lines = [f"=== {s.prefix}: {s.records} records, {s.tokens} tokens: {roles}",
             f"    targets with non-zero weight: {s.weighted_targets} of {s.targets} ({100 * s.weighted_fraction:.2f}%)"]
    for label, records in (("records without a response token", s.no_response),
                           ("records of one role throughout", [f"{r} ({role})" for r, role in s.one_role.items()])):
        if records:
            named = ", ".join(str(r) for r in records[:max_named]) + (", ..." if len(records) > max_named else "")
            lines.append(f"    {label}: {len(records)}: {named}")
        else:
            lines.append(f"    {label}: none")
    return "\n".join(lines) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #111; }
.sample { margin-bottom: 2em; } .record { border-left: 3px solid #888; margin: .6em 0; padding: .2em .6em; }
.rechead { font-size: .85em; color: #444; margin-bottom: .3em; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7; }
.tok, .ctx { border-right: 1px solid rgba(0,0,0,.25); padding: 1px 0; }
.ctx { background: %s; color: #555; font-style: italic; }
.w0 { opacity: .45; text-decoration: line-through; }
.special { font-weight: bold; }
.pad { color: #777; font-size: .85em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
""" % CONTEXT_HTML

_SCRIPT = """
for (const table of document.querySelectorAll('table.counts')) {
  const sample = document.getElementById(table.dataset.sample);
  for (const row of table.querySelectorAll('tr[data-role]')) {
    const toks = sample.querySelectorAll('.tok.r-' + row.dataset.role);
    let weighted = 0, mass = 0;
    for (const t of toks) { const w = parseFloat(t.dataset.w); if (w !== 0) weighted++; mass += w; }
    row.querySelector('.n').textContent = toks.length;
    row.querySelector('.nw').textContent = weighted;
    row.querySelector('.mass').textContent = mass.toPrecision(6);
  }
}
"""


def _html_sample(view: SampleView, text: TokenText, number: int) -> str:
    ids = view.tensors["labels"].tolist()
    weights = view.weights.tolist()
    sid = f"sample-{number}"
    parts = [f'<section class="sample" id="{sid}"><h2>{html.escape(view.title)}</h2>',
             f"<p>{html.escape(_header(view)[4:])}</p>"]
    rows = "".join(f'<tr data-role="{name}"><th style="background:{STYLES[name][3]}">{name}</th>'
                   f'<td class="n"></td><td class="nw"></td><td class="mass"></td></tr>' for name in view.counts())
    parts.append(f'<table class="counts" data-sample="{sid}"><tr><th>role</th><th>targets</th><th>non-zero weight</th>'
                 f"<th>Σ weight</th></tr>{rows}</table>")
    for seg in view.segments:
        parts.append(f'<div class="record" data-record="{seg.record}"><div class="rechead">record {seg.record} · document '
                     f"{seg.document} · positions {seg.start}–{seg.end - 1} · {seg.end - seg.start} targets</div>"
                     f'<div class="text"><span class="ctx" title="context: input only, never a target (id {seg.context_id})">'
                     f"{html.escape(text(seg.context_id))}</span>")
        for p in range(seg.start, seg.end):
            role, w, token_id = ROLE_NAMES[int(view.roles[p])], weights[p], ids[p]
            token = text(token_id)
            classes = f"tok r-{role}" + (" w0" if w == 0 else "") + (" special" if token_id in text.special else "")
            title = f"position {p} · id {token_id} · {role} · weight {w:g}"
            parts.append(f'<span class="{classes}" style="background:{STYLES[role][3]}" data-w="{w:.9g}" data-id="{token_id}" '
                         f'data-p="{p}" title="{html.escape(title)}">{html.escape(token)}</span>')
        parts.append("</div></div>")
    padding = view.seq_length - view.targets
    if padding:
        parts.append(f'<p class="pad">padding: {padding} positions (weight 0)</p>')
    parts.append("</section>")
    return "".join(parts)


def html_page(views: Iterable[SampleView], summaries: Iterable[DatasetSummary], text: TokenText, subtitle: str) -> str:
    summary_html = "".join(f"<pre>{html.escape(summary_text(s))}</pre>" for s in summaries)
    legend = " ".join(f'<span class="tok" style="background:{STYLES[name][3]}">{name}</span>' for name in STYLES)
    body = "".join(_html_sample(view, text, i) for i, view in enumerate(views))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>wit-inspect</title><style>{_CSS}</style>'
            f"</head><body><h1>wit-inspect</h1><p>{html.escape(subtitle)}</p><p>roles: {legend} · "
            f'<span class="ctx">context (input only)</span> · <span class="tok w0">weight 0</span></p>{summary_html}{body}'
            f"<script>{_SCRIPT}</script></body></html>\n")

