#!/usr/bin/env bash
# Documentation site: the Markdown of docs/ and an API reference generated from
# the docstrings (MkDocs + mkdocstrings, mkdocs.yml), built with warnings as
# errors in a fresh virtual environment. Takes about 30 seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --upgrade "pip>=25.1"
# The optional modules are documented too, so their dependencies are installed.
"$tmp/venv/bin/pip" install -q --group docs ".[fastapi,prometheus,otel,cli]" "pytest"
"$tmp/venv/bin/mkdocs" build --strict --site-dir "$tmp/site"
test -s "$tmp/site/reference/index.html"
grep -q "bound_to" "$tmp/site/reference/index.html"
echo "docs site built: $(find "$tmp/site" -name '*.html' | wc -l) pages"
