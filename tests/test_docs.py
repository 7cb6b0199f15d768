"""The documentation describes this repository as it is: every repository file README.md, the docs
pages and bench/README.md name exists (the release's files excepted when cited as the release's),
every relative link and its anchor resolves, README.md stays short enough to read in ten minutes,
and no page tells the history of its own making instead of describing the product."""
import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_MAX_LINES = 200

# Top-level folders of the repository: a path starting with one of them names a repository file
# (runs/..., /data/..., OUT/... do not).
REPO_DIRS = ("lafs_fast", "csrc", "kernels", "bench", "tests", "configs", "docs", ".ci")
# File types of the repository: a bare file name with one of these suffixes names a repository
# file (model.pt, feats.npy, metrics.jsonl are outputs, not repository files).
REPO_SUFFIXES = (".py", ".cpp", ".h", ".cu", ".cuh", ".sh", ".yaml", ".toml", ".cff", ".md")
# A missing path is allowed when the text cites it as the release's (its own files, at its commit).
RELEASE_CITATION = re.compile(r"release's|\b320c57d\b|LAFS_CVPR2024")
# Text about how the project was made, not about the product.
HISTORY = [r"\bsessions?\b", r"\bthis VM\b", r"\bVMs?\b", r"\blent\b", r"/work/", r"\bagents?\b",
           r"\bhelpers? [A-Z]\b", r"\bissue \d+", r"\bissue's\b", r"\bprevious session", r"\bthis session"]


def doc_pages():
    pages = ["README.md", os.path.join("bench", "README.md")]
    pages += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    pages += sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "bench", "*.md"))
                    if not p.endswith("README.md"))
    return pages


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def split_code(text):
    """(prose lines, code lines): fenced blocks and 4-space indented blocks are code."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        (code if fenced or line.startswith("    ") and not line.lstrip().startswith(("-", "*", "|"))
         else prose).append(line)
    return prose, code


def exists(path, page):
    """A repository path (globs allowed) relative to the repository root or to the page's folder;
    a bare file name may live anywhere in the repository."""
    path = path.rstrip("/")
    for base in (ROOT, os.path.dirname(os.path.join(ROOT, page))):
        if glob.glob(os.path.join(base, path)):
            return True
    if "/" not in path:
        return bool(glob.glob(os.path.join(ROOT, "**", path), recursive=True))
    return False


def strip_location(token):
    """`file.py:12-30` and `file.md#anchor` name file.py and file.md."""
    token = token.split("#")[0]
    return re.sub(r":[\d, -]+$", "", token)


def paragraphs(lines):
    """Blank-line separated blocks of lines, each joined into one string."""
    return [p for p in "\n".join(lines).split("\n\n") if p.strip()]


def named_paths(text):
    """(text before it in its paragraph, path) for every repository path the page names:
    single-token backtick spans and relative links in prose, repository-folder paths in code."""
    prose, code = split_code(text)
    found = []
    for para in paragraphs(prose):
        for m in re.finditer(r"`([^`\s]+)`", para):
            token = strip_location(m.group(1))
            first = token.split("/")[0]
            if not token or token.startswith(("/", "http", "-", "$")):
                continue
            bare_file = ("/" not in token and re.fullmatch(r"[\w*-]+(\.[\w-]+)*", token)
                         and token.endswith(REPO_SUFFIXES))
            if ("/" in token and first in REPO_DIRS) or bare_file:
                found.append((para[:m.start()], token))
        for m in re.finditer(r"\]\(([^)\s]+)\)", para):
            if not m.group(1).startswith(("http://", "https://", "#", "mailto:")):
                found.append((para[:m.start()], strip_location(m.group(1))))
    repo_path = r"(?<![\w/.$-])((?:%s)/[\w./*<>-]*)" % "|".join(map(re.escape, REPO_DIRS))
    for para in paragraphs(code):
        for m in re.finditer(repo_path, para):
            if "<" not in m.group(1):
                found.append((para[:m.start()], strip_location(m.group(1).rstrip(".,;:)"))))
    return found


def same_sentence(before):
    """The part of `before` in the sentence (or table row) that ends where a path is named."""
    cut = max(before.rfind(". "), before.rfind(".\n"), before.rfind("\n|"), before.rfind("| "))
    return before[cut + 1:]


def missing_paths(page, text):
    """Named paths that do not exist, unless their sentence or table cell cites them as the release's."""
    return [path for before, path in named_paths(text)
            if not exists(path, page) and not RELEASE_CITATION.search(same_sentence(before))]


def github_anchor(heading):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return slug.replace(" ", "-")


def anchors(text):
    prose, _ = split_code(text)
    return {github_anchor(m.group(1)) for line in prose for m in [re.match(r"#+\s+(.*)", line)] if m}


def broken_anchors(page, text):
    """Relative links whose #anchor is no heading of the page they point to."""
    prose, _ = split_code(text)
    bad = []
    for line in prose:
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if target.startswith(("http://", "https://", "mailto:")) or "#" not in target:
                continue
            file, anchor = target.split("#", 1)
            if not file:
                headings = anchors(text)
            else:
                path = os.path.normpath(os.path.join(os.path.dirname(os.path.join(ROOT, page)), file))
                if not os.path.isfile(path):
                    continue                     # a missing page is the path check's finding
                with open(path, encoding="utf-8") as f:
                    headings = anchors(f.read())
            if anchor not in headings:
                bad.append(target)
    return bad


@pytest.mark.parametrize("page", doc_pages())
def test_every_named_repository_file_exists(page):
    missing = missing_paths(page, read(page))
    assert not missing, f"{page} names files that are not in the repository: {missing}"


@pytest.mark.parametrize("page", doc_pages())
def test_every_link_anchor_exists(page):
    bad = broken_anchors(page, read(page))
    assert not bad, f"{page} links to headings that do not exist: {bad}"


@pytest.mark.parametrize("page", doc_pages())
def test_no_page_tells_how_the_project_was_made(page):
    text = read(page)
    hits = [(n + 1, m.group(0)) for n, line in enumerate(text.splitlines())
            for pattern in HISTORY for m in [re.search(pattern, line)] if m]
    assert not hits, f"{page}: history of the project's making (line, phrase): {hits}"


def source_files():
    """The repository's code, configs and CI scripts (this file excepted: it holds the patterns)."""
    found = []
    for top in ("lafs_fast", "kernels", "bench", "tests", "csrc", "configs", ".ci"):
        for path in glob.glob(os.path.join(ROOT, top, "**", "*"), recursive=True):
            if path.endswith((".py", ".cpp", ".h", ".cu", ".cuh", ".sh", ".yaml")) or os.path.basename(path) == "run":
                found.append(os.path.relpath(path, ROOT))
    return sorted(p for p in found if os.path.isfile(os.path.join(ROOT, p)) and not p.endswith("test_docs.py")
                  and "mutants" not in p.split(os.sep))


def test_no_source_file_tells_how_the_project_was_made_or_cites_missing_notes():
    """Comments and docstrings describe the product too; the method's facts live in docs/method.md."""
    files = source_files()
    assert len(files) > 100 and "lafs_fast/train/run.py" in files and "csrc/lafs_ops.cpp" in files
    patterns = HISTORY + [r"LAFS_FACTS", r"ARCHITECTURE\.md"]
    hits = [f"{path}:{n + 1}: {m.group(0)}" for path in files
            for n, line in enumerate(read(path).splitlines())
            for pattern in patterns for m in [re.search(pattern, line)] if m]
    assert not hits, "history of the project's making, or notes outside the repository: " + "; ".join(hits)


def test_readme_is_short():
    lines = read("README.md").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {README_MAX_LINES})"


def test_the_docs_pages_exist_and_the_readme_links_them():
    readme = read("README.md")
    for page in ("method", "ops", "training", "release", "performance", "layout", "testing",
                 "gpu_check", "evaluation"):
        assert f"](docs/{page}.md)" in readme, f"README.md does not link docs/{page}.md"
        assert os.path.isfile(os.path.join(ROOT, "docs", f"{page}.md")), f"docs/{page}.md is missing"


def test_licence_and_citation():
    assert "MIT License" in read("LICENSE")
    cff = read("CITATION.cff")
    for fact in ("cff-version: 1.2.0", "preferred-citation:",
                 'title: "LAFS: Landmark-based Facial Self-supervised Learning for Face Recognition"',
                 "https://arxiv.org/abs/2403.08161", "https://github.com/szlbiubiubiu/LAFS_CVPR2024"):
        assert fact in cff, f"CITATION.cff lacks {fact!r}"
    for name in ("Sun", "Feng", "Patras", "Tzimiropoulos"):
        assert f"family-names: {name}" in cff


# ----------------------------------------------------------------------------- the checker itself
def test_the_path_check_sees_a_missing_file_and_allows_the_releases():
    text = ("The op lives in `lafs_fast/reference.py` and `csrc/cpu/*.cpp`; see [ops](docs/ops.md).\n"
            "Also `lafs_fast/no_such_module.py`, `no_such_test.py` and [gone](docs/gone.md).\n"
            "The release's\n`lafs_train.py` and `face_pre_pro/ViT_face.py` are not ours. But `tests/gone.py` is.\n"
            "| a | the release's way | `bench/gone.py` |\n"
            "    python bench/no_such_script.py --out runs/x.json\n"
            "Outputs `model.pt`, `runs/pipeline/1_supervised/landmarks.png`, `/data/train`.\n")
    assert missing_paths("README.md", text) == ["lafs_fast/no_such_module.py", "no_such_test.py",
                                                "tests/gone.py", "bench/gone.py", "docs/gone.md",
                                                "bench/no_such_script.py"]


def test_the_history_patterns_catch_history_and_spare_the_product():
    history = ["measured in the previous session", "on this VM", "no GPU was lent", "/work/wt-docs",
               "other agents' jobs", "the issue 10 machine"]
    product = ["a 2-core AMD EPYC 9xx4 (Zen 4)", "the release's step", "load average 3.5", "silently"]
    assert all(any(re.search(p, t) for p in HISTORY) for t in history)
    assert not any(re.search(p, t) for p in HISTORY for t in product)


def test_the_anchor_check_sees_a_broken_anchor():
    text = "[ok](#the-op-landmark_patch_embed) [bad](#no-such-heading) [page](docs/ops.md#backends)\n\n" \
           "## The op: `landmark_patch_embed`\n"
    assert broken_anchors("README.md", text) == ["#no-such-heading"]


def test_the_code_map_names_every_module():
    """docs/layout.md is the newcomer's map: a module missing from it is a module nobody finds."""
    text = read(os.path.join("docs", "layout.md"))
    modules = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "lafs_fast", "**", "*.py"),
                                                                  recursive=True))
    skip = {"__init__.py", "_build_info.py"}
    missing = [m for m in modules if os.path.basename(m) not in skip and f"`{m}`" not in text
               and os.sep + "kernels" + os.sep not in m]
    assert not missing, f"docs/layout.md does not name: {missing}"
