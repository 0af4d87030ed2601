#!/usr/bin/env bash
# A user's environment on today's stack (torch CPU, transformers 5, sentence-transformers 6), then this package
# beside it with [serve]: transformers must stay at 5.x. Needs the package index; about three minutes.
#   bash ci/fresh_stack.sh [VENV_DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-/tmp/qbert-fresh-stack}"
rm -rf "$venv"
python3 -m venv "$venv"
py="$venv/bin/python"
$py -m pip install -q --upgrade pip
$py -m pip install -q torch==2.13.0
$py -m pip install -q 'transformers>=5' 'sentence-transformers>=6'
echo "before: $($py -c 'import transformers, sentence_transformers as s; print("transformers", transformers.__version__, "sentence-transformers", s.__version__)')"
$py -m pip install -q "$root[serve]"
after="$($py -c 'import transformers, sentence_transformers as s; print("transformers", transformers.__version__, "sentence-transformers", s.__version__)')"
echo "after installing qbert-deploy[serve]: $after"
case "$after" in "transformers 5."*) echo "fresh stack: transformers kept at 5.x";; *) echo "fresh stack: transformers was downgraded" >&2; exit 1;; esac
