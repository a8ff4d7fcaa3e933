#!/usr/bin/env bash
# Dependency floors: a fresh virtual environment with the lowest versions that
# pyproject.toml allows of SQLAlchemy, FastAPI and every driver, running the
# semantics grid and the FastAPI tests on SQLite, PostgreSQL and MariaDB.
# Takes about 1-2 minutes (installs, then ~400 tests).
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=$(mktemp -d)/floors
trap 'rm -rf "$(dirname "$venv")"' EXIT

# Keep these equal to the floors in pyproject.toml (the check below enforces it).
floors=(
    "SQLAlchemy==2.0.0"
    "aiosqlite==0.19.0"
    "psycopg[binary]==3.1.4"
    "asyncpg==0.28.0"
    "PyMySQL==1.1.0"
    "aiomysql==0.2.0"
    "fastapi==0.121.0"
)

python3 - "${floors[@]}" <<'PY'
import re, sys, tomllib
meta = tomllib.load(open("pyproject.toml", "rb"))["project"]
declared = list(meta["dependencies"])
for extra in ("postgresql", "mysql", "fastapi"):
    declared += meta["optional-dependencies"][extra]
floor = {}
for req in declared:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9.]+)", req)
    assert m, f"no >= floor in {req!r}"
    # typing_extensions: whatever pydantic (FastAPI) and SQLAlchemy resolve to is
    # above it, so its floor cannot be installed beside them; not pinned here.
    if m.group(1).lower() != "typing_extensions":
        floor[m.group(1).lower()] = m.group(2)
tested = dict(
    re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([0-9.]+)", pin).groups()
    for pin in sys.argv[1:]
)
tested = {k.lower(): v for k, v in tested.items()}
if floor != tested:
    sys.exit(f"floors out of step with pyproject.toml:\n  declared {floor}\n  tested   {tested}")
PY

python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade "pip>=25.1"
# The floors as constraints: every other package (greenlet, starlette, pydantic,
# the test tools) resolves as a user's would.
printf '%s\n' "${floors[@]}" | sed 's/\[[^]]*\]//' > "$venv/floors.txt"
"$venv/bin/pip" install -q -c "$venv/floors.txt" \
    ".[postgresql,mysql,fastapi]" "pytest>=8" "pytest-asyncio>=0.23" "httpx>=0.25"
"$venv/bin/pip" list 2>/dev/null | grep -iE '^(sqlalchemy|aiosqlite|psycopg|psycopg-binary|asyncpg|pymysql|aiomysql|fastapi|starlette|pydantic) '

# The installed package, not the source tree: run from a copy of the tests.
work=$(dirname "$venv")/run
mkdir -p "$work"
cp -r tests pyproject.toml "$work/"
cd "$work"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_semantics.py tests/test_fastapi.py

# Below the floor: FastAPI 0.120 lacks Depends(scope=...), and importing the
# integration must say so (an ImportError naming the version), not misbehave.
"$venv/bin/pip" install -q "fastapi==0.120.*"
"$venv/bin/python" - <<'PY'
try:
    import sessionscope.fastapi  # noqa: F401
except ImportError as err:
    assert "needs FastAPI >= 0.121" in str(err), err
    print("FastAPI 0.120:", err)
else:
    raise SystemExit("sessionscope.fastapi imported with FastAPI 0.120")
PY
