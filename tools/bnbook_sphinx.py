"""Sphinx glue for the book's API reference (loaded through _config.yml's sphinx.local_extensions).

1. Cross-references to re-exported names: docstrings say :func:`bnutils.train` (how a reader
   imports it), while the API page documents it where it is defined (bnutils.training.train).
   Unresolved ``bnutils.NAME`` references are pointed at the object ``bnutils.NAME`` really is.
2. Plain-text math in docstrings: bnutils' docstrings are written to read well in ``help()``, where
   ``(N, C, *spatial)`` and ``|mean|`` are plain text; in reStructuredText they would start an
   emphasis or a substitution (and a literal glued to a word, as in "``Module``s", is never closed),
   breaking the strict build. Such characters are escaped, outside ``literal`` spans only, so the
   page shows exactly what the docstring says.
3. sphinx-thebe (which Jupyter Book always loads) writes a Binder repository into every page's
   thebe configuration, a template's example unless told otherwise; it is pointed at the book's own
   repository (_config.yml's repository.url, the one setting), so no page names another project.
4. Scripts that extensions add while the build runs (sphinx-thebe's ``const THEBE_JS_URL``,
   sphinx-togglebutton's settings) reach Sphinx 7.4's page context twice; a second ``const``
   declaration is a SyntaxError in the browser. Each page's script list is de-duplicated.
"""
from __future__ import annotations

import importlib
import re

from docutils import nodes
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

# A '|' that is not already escaped: |x| or ||x|| would start a substitution reference.
_BAR = re.compile(r"(?<!\\)\|")
# '*' or '**' that opens inline markup (after a line start, space or opening bracket, before a
# non-space), and the closing string that would end it.
_OPEN = {1: re.compile(r"(?:^|(?<=[\s(\[{,'\"]))\*(?=[^\s*])"),
         2: re.compile(r"(?:^|(?<=[\s(\[{,'\"]))\*\*(?=[^\s*])")}
_CLOSE = {1: re.compile(r"(?<=[^\s\\*])\*(?![\w*])"), 2: re.compile(r"(?<=[^\s\\*])\*\*(?!\w)")}


def _escape_unmatched(text: str, width: int) -> str:
    out, pos = [], 0
    for match in _OPEN[width].finditer(text):
        start = match.start()
        if start < pos:
            continue
        close = _CLOSE[width].search(text, match.end())
        if close is None:
            out.append(text[pos:start] + "\\*" * width)
            pos = match.end()
        else:
            out.append(text[pos:close.end()])
            pos = close.end()
    out.append(text[pos:])
    return "".join(out)


def _escape_text(text: str) -> str:
    """Escape unmatched emphasis/strong openers and every '|' in one non-literal span."""
    text = _BAR.sub(r"\\|", text)
    return _escape_unmatched(_escape_unmatched(text, 2), 1)


def escape_plain_text_markup(line: str) -> str:
    """Escape ``line`` outside its ``double-backtick`` literals and `single-backtick` roles."""
    if line.strip() == "|" or line.lstrip().startswith(("| ", "+-", "+=")):
        return line  # a line block or a grid table: '|' is markup there
    parts = re.split(r"(``.*?``|`[^`]*`)", line)
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            part = _escape_text(part)
            if i and re.match(r"\w", part):
                part = "\\ " + part  # ``Module``s -> ``Module``\ s: an escaped space, rendered as nothing
        out.append(part)
    return "".join(out)


def _process_docstring(app, what, name, obj, options, lines: list[str]) -> None:
    lines[:] = [escape_plain_text_markup(line) for line in lines]


def _resolve_reexport(app: Sphinx, env: BuildEnvironment, node: pending_xref,
                      contnode: nodes.Element) -> nodes.Element | None:
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("bnutils.") or target.count(".") != 1:
        return None
    package = importlib.import_module("bnutils")
    obj = getattr(package, target.split(".", 1)[1], None)
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or f"{module}.{qualname}" == target:
        return None
    domain = env.get_domain("py")
    node["reftarget"] = f"{module}.{qualname}"
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], node["reftarget"],
                               node, contnode)


def _thebe_uses_our_repository(app: Sphinx, config) -> None:
    theme = config.html_theme_options or {}
    thebe = config.thebe_config if isinstance(config.thebe_config, dict) else {}
    if theme.get("repository_url"):
        thebe.setdefault("repository_url", theme["repository_url"])
        thebe.setdefault("repository_branch", theme.get("repository_branch", "main"))
        config.thebe_config = thebe


def _unique_scripts(app: Sphinx, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for js in sorted(scripts, key=lambda js: getattr(js, "priority", 500)):
        key = (getattr(js, "filename", js) or "", tuple(sorted(getattr(js, "attributes", {}).items())))
        if key not in seen:  # the same tag twice, whatever priority each copy was given
            seen.add(key)
            unique.append(js)
    scripts[:] = unique


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _thebe_uses_our_repository)
    app.connect("autodoc-process-docstring", _process_docstring)
    app.connect("missing-reference", _resolve_reexport)
    app.connect("html-page-context", _unique_scripts, priority=900)  # after every script is added
    return {"parallel_read_safe": True, "parallel_write_safe": True}
