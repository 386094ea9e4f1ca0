#!/usr/bin/env bash
# Everything the test suite reads that is not in the repository: the default model
# (scripts/fetch-default-model.sh) and llama.cpp's tokenizer test vocabularies
# (scripts/fetch-vocabs.sh). Both are idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bash "$here/fetch-default-model.sh"
bash "$here/fetch-vocabs.sh"
