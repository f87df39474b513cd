"""Site hygiene that needs no browser: one repository setting, a complete API page, a local MathJax,
the appendices in the table of contents, the publishing workflow. tests/test_browser.py checks the
built pages themselves."""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import yaml

import bnutils

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
REPO = CONFIG["repository"]["url"]
BRANCH = CONFIG["repository"].get("branch", "main")
NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))
API = (ROOT / "api.md").read_text()
PIP_GIT = re.compile(r"%pip install[^\n]*git\+([^\s\"'#]+)")


def installs_from(source: str) -> list[str]:
    """The repositories (no @ref, no .git) that the %pip install ... git+URL lines in ``source`` use."""
    urls = []
    for url in PIP_GIT.findall(source):
        scheme, rest = url.split("://", 1)
        urls.append(f"{scheme}://{rest.split('@', 1)[0]}".removesuffix(".git"))
    return urls


def test_repository_setting_is_one_github_repository():
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", REPO), REPO
    launch = CONFIG["launch_buttons"]
    assert launch.get("colab_url") and launch.get("binderhub_url"), "Colab and Binder buttons"
    assert CONFIG["html"].get("use_repository_button") and CONFIG["html"].get("use_download_button")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_first_cell_installs_bnutils_from_the_books_repository(path):
    """Outside a checkout (Colab, Binder, a downloaded notebook) the first cell installs bnutils from
    the same repository that _config.yml's repository.url names and the launch buttons open."""
    cells = [c for c in json.loads(path.read_text())["cells"]
             if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    first = "".join(cells[0]["source"])
    assert re.search(r"try:\s*\n\s*import bnutils\s*\n\s*except ImportError:", first), \
        "first cell: try: import bnutils / except ImportError: %pip install ... (CONTRIBUTING.md)"
    urls = installs_from(first)
    assert urls, "the first cell does not %pip install bnutils from git"
    assert set(urls) == {REPO}, f"{urls} != repository.url {REPO}"


def test_contributing_pattern_uses_the_repository_url():
    urls = installs_from((ROOT / "CONTRIBUTING.md").read_text())
    assert urls and set(urls) == {REPO}, urls


def test_installs_from_handles_branches():
    assert installs_from('%pip install "bnutils @ git+https://github.com/a/b@main"') == ["https://github.com/a/b"]
    assert installs_from('%pip install "bnutils @ git+https://github.com/a/b"') == ["https://github.com/a/b"]
    assert installs_from("%pip install git+https://github.com/a/b.git@v1") == ["https://github.com/a/b"]


def documented_modules() -> set[str]:
    return set(re.findall(r"^\.\. automodule:: bnutils\.(\w+)", API, re.M))


def test_api_reference_documents_every_module():
    modules = {p.stem for p in (ROOT / "bnutils").glob("*.py") if not p.stem.startswith("_")}
    documented = documented_modules()
    assert not modules - documented, f"add to api.md: {sorted(modules - documented)}"
    assert not documented - modules, f"api.md documents missing modules: {sorted(documented - modules)}"


def test_every_public_name_is_on_the_api_page():
    """Every function and class in bnutils.__all__ is defined in a module the API page documents."""
    documented = documented_modules()
    for name in bnutils.__all__:
        module = getattr(getattr(bnutils, name), "__module__", "") or ""
        if module.startswith("bnutils."):
            assert module.split(".")[1] in documented, f"{name} ({module}) is not on the API page"


def test_mathjax_comes_from_the_build_not_a_cdn():
    sphinx = CONFIG["sphinx"]
    path = sphinx["config"]["mathjax_path"]
    assert "://" not in path and not path.startswith("/"), "mathjax_path must be local"
    assert "sphinx-mathjax-offline" in sphinx["extra_extensions"]
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    assert spec is not None, "pip install -r requirements.txt (sphinx-mathjax-offline)"
    shipped = Path(spec.origin).parent / "static" / "mathjax" / path.removeprefix("mathjax/")
    assert shipped.is_file(), shipped
    assert shipped.stat().st_size > 100_000, "not the MathJax component"
    # Jupyter Book adds every .js under _static/ to every page: MathJax must not live there.
    assert not list((ROOT / "_static").rglob("*mathjax*")) if (ROOT / "_static").exists() else True


def test_appendices_are_in_the_table_of_contents():
    files = re.findall(r"file:\s*(\S+)", (ROOT / "_toc.yml").read_text())
    for page in ("seeds", "running", "api", "glossary", "bibliography"):
        assert page in files and (ROOT / f"{page}.md").is_file(), page


def test_seeds_page_has_a_label_per_post_and_links_chapters_and_the_claims_table():
    """Chapters link {ref}`seed-000` etc.; each post's claims link the chapter testing them."""
    text = (ROOT / "seeds.md").read_text()
    sections = re.split(r"^\(seed-(\d{3})\)=\n", text, flags=re.M)
    assert [sections[i] for i in range(1, len(sections), 2)] == ["000", "001", "002"]
    for body in sections[2::2]:
        body = body.split("\n## Beyond", 1)[0]
        assert body.startswith("## "), "the label must sit right above the post's heading"
        for field in ("**Title:**", "**Author:**", "**Date:**"):
            assert field in body
        linked = re.findall(r"\{doc\}`[^`<]*<(chapters/[^>]+)>`", body)
        assert linked, "each post's claims link the chapters that test them"
        for doc in linked:
            assert (ROOT / f"{doc}.ipynb").is_file(), doc
    assert "{doc}`the claims table <chapters/18_claims_vs_evidence>`" in text.replace("\n", " ")


def test_publish_workflow_builds_and_deploys_on_push_to_main():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "publish.yml").read_text())
    on = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare 'on' key as True
    assert on["push"]["branches"] == [BRANCH]
    steps = [s for job in workflow["jobs"].values() for s in job.get("steps", [])]
    runs = " ".join(s.get("run", "") for s in steps)
    uses = [s.get("uses", "") for s in steps]
    assert ("requirements.txt" in runs or "make setup" in runs) and "jupyter-book build" in runs
    assert any(u.startswith("actions/upload-pages-artifact@") for u in uses)
    assert any(u.startswith("actions/deploy-pages@") for u in uses)


WORKFLOW = yaml.safe_load((ROOT / ".github" / "workflows" / "publish.yml").read_text())
READ_ONLY = {"read", "none"}


def _job_with(uses_prefix: str) -> tuple[str, dict]:
    jobs = [(name, job) for name, job in WORKFLOW["jobs"].items()
            if any(s.get("uses", "").startswith(uses_prefix) for s in job.get("steps", []))]
    assert len(jobs) == 1, f"one job should use {uses_prefix}, found {[n for n, _ in jobs]}"
    return jobs[0]


def test_publish_workflow_grants_each_job_only_what_it_needs():
    top = WORKFLOW.get("permissions")
    assert top is not None, "no top-level permissions: the token gets the repository default (often write)"
    assert top == {} or top == "read-all" or (isinstance(top, dict) and set(top.values()) <= READ_ONLY), \
        f"top-level permissions must be read-only, got {top}"
    deploy_name, deploy = _job_with("actions/deploy-pages@")
    assert deploy.get("permissions") == {"pages": "write", "id-token": "write"}, deploy.get("permissions")
    for name, job in WORKFLOW["jobs"].items():
        if name != deploy_name:
            perms = job.get("permissions")
            assert isinstance(perms, dict) and set(perms.values()) <= READ_ONLY, f"job {name}: {perms}"
    _, build = _job_with("actions/upload-pages-artifact@")
    assert build.get("permissions") == {"contents": "read"}, build.get("permissions")


def test_publish_workflow_verifies_the_outputs_before_building_and_uploading():
    _, build = _job_with("actions/upload-pages-artifact@")
    steps = build["steps"]

    def index(predicate, what):
        found = [i for i, s in enumerate(steps) if predicate(s)]
        assert found, f"the build job has no step that {what}"
        return found[0]

    install = index(lambda s: "requirements.txt" in s.get("run", "") or "make setup" in s.get("run", ""),
                    "installs the environment")
    verify = index(lambda s: re.search(r"\bmake verify\b", s.get("run", "")), "runs make verify")
    build_book = index(lambda s: "jupyter-book build" in s.get("run", ""), "builds the book")
    upload = index(lambda s: s.get("uses", "").startswith("actions/upload-pages-artifact@"), "uploads")
    assert install < verify < build_book < upload, (install, verify, build_book, upload)
    assert "download.pytorch.org/whl/cpu" in steps[install]["run"], "install torch's CPU build"


def test_requirements_pin_the_site_tools():
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    for package in ("playwright", "sphinx-mathjax-offline", "jupyter-book", "sphinx"):
        assert package in pins, f"{package} is not pinned in requirements.txt"


def _sphinx_glue():
    spec = importlib.util.spec_from_file_location("bnbook_sphinx", ROOT / "tools" / "bnbook_sphinx.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("line, expected", [
    ("x (N, C, *spatial), gamma (C,)", r"x (N, C, \*spatial), gamma (C,)"),
    ("||a - b|| / max(|a|, tiny)", r"\|\|a - b\|\| / max(\|a\|, tiny)"),
    ("*unbiased* variance, var * M, **strong**", "*unbiased* variance, var * M, **strong**"),
    ("f(*args, **kwargs)", r"f(\*args, \*\*kwargs)"),
    ("as ``nn.Module``s and ``x`` = ``|y|``", r"as ``nn.Module``\ s and ``x`` = ``|y|``"),
    (":func:`bnutils.train` and ``a*b``", ":func:`bnutils.train` and ``a*b``"),
    ("| a line block |", "| a line block |"),
])
def test_docstring_plain_text_is_escaped_for_restructuredtext(line, expected):
    assert _sphinx_glue().escape_plain_text_markup(line) == expected


def test_binder_environment_runs_the_chapters_on_cpu_torch_at_the_book_pins():
    def pins(path):
        return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), re.M))
    binder, book = pins(ROOT / "binder" / "requirements.txt"), pins(ROOT / "requirements.txt")
    text = (ROOT / "binder" / "requirements.txt").read_text()
    assert "download.pytorch.org/whl/cpu" in text, "Binder would install PyPI's CUDA build of torch"
    for package, version in binder.items():
        assert book.get(package) == version, f"{package}: binder {version}, book {book.get(package)}"
    imported = {"torch", "numpy", "matplotlib", "seaborn", "scikit-learn", "mnist1d", "ipykernel"}
    assert imported <= binder.keys(), imported - binder.keys()
    post_build = ROOT / "binder" / "postBuild"
    assert "pip install --no-deps -e ." in post_build.read_text() and os.access(post_build, os.X_OK)


# ----------------------------------------------------------------------------- the built site

HTML = ROOT / "_build" / "html"
BUILT_TEXT = ("*.html", "*.js", "*.txt", "*.ipynb", "*.md", "*.json")


def environment_leaks(text: str, environ=os.environ) -> list[str]:
    """What of the build machine's environment ``text`` contains: an ``environ(`` repr, the value of
    $HOME (as a path), the value of $PATH."""
    leaks = []
    if "environ(" in text:
        leaks.append("environ(")
    home = environ.get("HOME", "").rstrip("/")
    if len(home) > 1 and re.search(re.escape(home) + r"(?![\w.-])", text):
        leaks.append(f"$HOME ({home})")
    path = environ.get("PATH", "")
    if path and path in text:
        leaks.append("$PATH")
    return leaks


def test_environment_leaks_finds_each_kind():
    env = {"HOME": "/home/builder", "PATH": "/opt/x/bin:/usr/bin:/bin"}
    assert environment_leaks("pin(environ=environ({'A': '1'}))", env) == ["environ("]
    assert environment_leaks("cache in /home/builder/.cache", env) == ["$HOME (/home/builder)"]
    assert environment_leaks("PATH=/opt/x/bin:/usr/bin:/bin; ok", env) == ["$PATH"]
    assert environment_leaks("/home/builderx and /usr/bin alone are fine", env) == []


def test_no_built_page_contains_the_build_environment():
    """Issue 11: api.md once rendered a default ``environ=os.environ`` as the build machine's whole
    environment. autodoc_preserve_defaults shows defaults as written; this checks every built file."""
    assert CONFIG["sphinx"]["config"].get("autodoc_preserve_defaults") is True
    if not (HTML / "index.html").exists():
        if os.environ.get("CI"):
            pytest.fail("no _build/html: build the book first (tools/run_checks.sh does)")
        pytest.skip("no _build/html: build the book first")
    files = [p for pattern in BUILT_TEXT for p in HTML.rglob(pattern)]
    assert any(p.name == "api.html" for p in files)
    found = {}
    for p in files:
        leaks = environment_leaks(p.read_text(errors="replace"))
        if leaks:
            found[p.relative_to(HTML).as_posix()] = leaks
    assert not found, f"built files contain the build machine's environment: {found}"


# ----------------------------------------------------------------------------- running it locally

def test_readme_quick_start_names_python_311_and_the_cpu_wheel_before_the_first_command():
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    first_command = quick.index("```bash")
    assert "PYTHON=python3.11" in quick
    assert "download.pytorch.org/whl/cpu" in quick[:quick.index("```", first_command + 7)], \
        "the first command must get torch's CPU wheel"


def test_docs_no_longer_describe_the_removed_cpu_pinning():
    for page in ("README.md", "running.md"):
        text = (ROOT / page).read_text()
        assert "bnutils.cpu" not in text and "BNUTILS_NATIVE_CPU" not in text, page
        assert "make verify" in text, f"{page}: say how verification works now"


def test_make_lab_runs_jupyterlab_from_the_pinned_environment():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^lab: \$\(STAMP\).*\n\t(.+)$", makefile, re.M)
    assert recipe and "$(BIN)/jupyter lab" in recipe.group(1)
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.txt").read_text(), re.M))
    assert re.fullmatch(r"\d+\.\d+\.\d+", pins.get("jupyterlab", "")), "pin jupyterlab exactly"
