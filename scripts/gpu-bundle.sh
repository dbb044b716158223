#!/usr/bin/env bash
# Packs what a GPU host needs to test and benchmark this build, for a machine that has the NVIDIA
# driver but no Rust, no CUDA toolkit and no network: the release test and bench executables and
# the qlora-rs binary (GPU kernels embedded, stripped) in .gpu/bin/, and scripts/gpu-run.sh as
# .gpu/run.sh. Copy the project folder with .gpu/ in it (the tests read tests/fixtures/ from the
# current directory), then on the GPU host, from the project root:
#
#   bash .gpu/run.sh [tests|benches|all] [filter]
#
# Needs nvcc here (scripts/install-nvcc.sh; QLORA_REQUIRE_KERNELS=1 is set, so a build without
# kernels fails). Extra arguments go to cargo. The bundle is about 40 MiB.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
export QLORA_REQUIRE_KERNELS=1
rm -rf .gpu
mkdir -p .gpu/bin

# Copies the executables cargo reports (its JSON messages on stdin) of one kind into .gpu/bin:
# test-<kind>-<target> for tests, bench-<name> for benches, the binary under its own name.
gather_py=$(cat <<'PY'
import json, os, shutil, sys
kind = sys.argv[1]
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-message":
        sys.stderr.write(msg.get("message", {}).get("rendered") or "")
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    target = msg["target"]
    if kind == "tests" and msg["profile"]["test"]:
        name = "test-%s-%s" % (target["kind"][0], target["name"])
    elif kind == "benches" and "bench" in target["kind"]:
        name = "bench-" + target["name"]
    elif kind == "bins" and "bin" in target["kind"]:
        name = target["name"]
    else:
        continue
    shutil.copy2(msg["executable"], os.path.join(".gpu/bin", name))
    print("bundled", name)
PY
)
gather() { python3 -c "$gather_py" "$1"; }

cargo test --release --no-run --message-format=json "$@" | gather tests
cargo bench --no-run --message-format=json "$@" | gather benches
cargo build --release --message-format=json "$@" | gather bins
strip .gpu/bin/* 2>/dev/null || true
cp scripts/gpu-run.sh .gpu/run.sh
echo "bundle: $(du -sh .gpu | cut -f1) in .gpu/; on the GPU host: bash .gpu/run.sh all"
