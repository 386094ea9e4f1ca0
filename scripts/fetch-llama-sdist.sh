#!/usr/bin/env bash
# Downloads the llama-cpp-python sdist (the llama.cpp sources we test and benchmark against)
# from PyPI's simple index into DIR, its sha256 checked against the index's. `pip download`
# is not used: it prepares an sdist's metadata first, which needs CMake.
#   scripts/fetch-llama-sdist.sh DIR      (prints the tarball's path)
set -euo pipefail
version=0.3.36
dest=$1
mkdir -p "$dest"
python3 - "$version" "$dest" <<'PY'
import hashlib, os, re, sys, urllib.request
version, dest = sys.argv[1], sys.argv[2]
name = f"llama_cpp_python-{version}.tar.gz"
path = os.path.join(dest, name)
with urllib.request.urlopen("https://pypi.org/simple/llama-cpp-python/", timeout=60) as r:
    index = r.read().decode()
found = re.search(r'href="([^"#]*/' + re.escape(name) + r')#sha256=([0-9a-f]{64})"', index)
if not found:
    sys.exit(f"error: {name} is not in PyPI's index")
url, want = found.groups()
h = hashlib.sha256()
with urllib.request.urlopen(url, timeout=600) as r, open(path + ".partial", "wb") as f:
    while chunk := r.read(1 << 20):
        h.update(chunk)
        f.write(chunk)
if h.hexdigest() != want:
    os.remove(path + ".partial")
    sys.exit(f"error: sha256 of {name} does not match PyPI's")
os.replace(path + ".partial", path)
print(path)
PY
