#!/usr/bin/env bash
# The public API's types as users see them: tests/typing/public_api.py must pass
# mypy --strict (on the oldest and the newest supported Python) and pyright in
# strict mode (basedpyright, which bundles its own Node.js). Both fail on an
# assert_type that does not hold and on a "# type: ignore" that is not needed.
set -euo pipefail
cd "$(dirname "$0")/../.."

.venv/bin/pip install -q -e '.[postgresql,mysql,fastapi,prometheus,otel,cli]' --group dev --group typing

for version in 3.10 3.13; do
    echo "+ mypy --strict --python-version $version tests/typing"
    .venv/bin/mypy --strict --python-version "$version" tests/typing/public_api.py
done
echo "+ basedpyright (strict, tests/typing)"
.venv/bin/basedpyright --pythonpath .venv/bin/python
