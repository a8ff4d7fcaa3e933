#!/usr/bin/env bash
# Packaging: build the sdist and the wheel, check their metadata with twine,
# install the wheel (with the cli extra) into a fresh virtual environment and
# run `sessionscope demo` there in an empty directory; then run a slice of the
# test suite from the unpacked sdist, which must carry the tests' conftest and
# helpers. Takes about 1 minute.
set -euo pipefail
cd "$(dirname "$0")/../.."

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python3 -m venv "$tmp/tools"
"$tmp/tools/bin/pip" install -q --upgrade "pip>=25.1" build twine
"$tmp/tools/bin/python" -m build --outdir "$tmp/dist" . > "$tmp/build.log" 2>&1 || {
    cat "$tmp/build.log"; exit 1; }
ls -l "$tmp/dist"
"$tmp/tools/bin/twine" check --strict "$tmp/dist"/*

wheel=$(ls "$tmp/dist"/*.whl)
sdist=$(ls "$tmp/dist"/*.tar.gz)

# The wheel holds the package only, and its metadata publishes no development
# group as an extra.
"$tmp/tools/bin/python" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
outside = sorted({n.split("/")[0] for n in names} - {"sessionscope"}
                 - {n.split("/")[0] for n in names if ".dist-info/" in n})
assert not outside, f"the wheel carries more than the package: {outside}"
meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
text = zipfile.ZipFile(sys.argv[1]).read(meta).decode()
extras = sorted(l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("Provides-Extra:"))
print("extras:", extras)
assert extras == [
    "cli", "fastapi", "flask", "litestar", "mysql", "otel", "postgresql", "prometheus", "starlette"
], extras
assert "License-Expression: MIT" in text and "License-File: LICENSE" in text
PY

python3 -m venv "$tmp/user"
"$tmp/user/bin/pip" install -q "$wheel[cli]"
mkdir "$tmp/demo"
(cd "$tmp/demo" && env -u DATABASE_URL "$tmp/user/bin/sessionscope" demo | tail -n 25)
test -f "$tmp/demo/sessionscope.db"

# The sdist's tests run against the sdist's source (SQLite slice: the servers
# are covered by the main run).
mkdir "$tmp/sdist"
tar -xzf "$sdist" -C "$tmp/sdist"
src=$(ls -d "$tmp/sdist"/sessionscope-*)
for f in tests/conftest.py tests/grid.py tests/models.py tests/faults.py LICENSE CHANGELOG.md; do
    test -f "$src/$f" || { echo "sdist lacks $f" >&2; exit 1; }
done
(cd "$src" && PYTHONPATH=src "$OLDPWD/.venv/bin/python" -m pytest -q -p no:cacheprovider \
    -k sqlite tests/test_semantics.py)
