#!/usr/bin/env bash
# Build a Poltergust release from this checkout: the wheel of the package
# and a lock file of its runtime dependencies with their sha256 hashes.
# The deploy (Terraform module, deploy/gcloud/create.sh, clusters/) uploads
# both to gs://BUCKET/_poltergust/dist/VERSION/, and every VM installs
# exactly these files with `pip install --require-hashes`: no package name
# is ever looked up on the index without a hash.
#
# Usage: deploy/build-release.sh [--out-dir DIR] [--python-version V] [--platform P]
#                                [--wheelhouse DIR]
#
#   --out-dir DIR         where releases go (default: deploy/dist)
#   --python-version V    Python of the VMs the lock is resolved for
#                         (default: 3.11.2, the python3 of Debian 12)
#   --platform P          their platform, as uv's --python-platform
#                         (default: x86_64-manylinux_2_36, Debian 12 on x86-64)
#   --wheelhouse DIR      build and lock from the wheels in DIR only, never
#                         the package index (uv has no variable for that)
#
# Writes DIR/VERSION/ (the wheel, requirements.lock, release.json) and
# DIR/release.json, a copy of the newest release's manifest that the
# deploy reads:
#   {"version": ..., "wheel": FILE, "wheel_sha256": ..., "lock": FILE,
#    "lock_sha256": ..., "python_version": ..., "platform": ..., "commit": ...}
# VERSION is the package version plus a digest of the wheel and the lock, so
# a changed checkout or a changed dependency is a new release, and building
# the same checkout again gives the same files (SOURCE_DATE_EPOCH is the
# last commit's time).
#
# Needs uv (the UV variable, else uv on PATH; `pip install uv`) and python3.
# uv's own settings (UV_INDEX_URL, ...) apply. Only binary wheels enter the lock.
set -euo pipefail
shopt -s inherit_errexit

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$HERE/.." && pwd)
OUT_DIR="$HERE/dist"
PYTHON_VERSION=3.11.2
PLATFORM=x86_64-manylinux_2_36
SOURCES=()  # uv's options naming where packages come from

log() { printf 'build-release: %s\n' "$*" >&2; }
# sha256 of file $1 (python3, so that this runs where sha256sum is missing too).
sha256() { python3 -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }
die() { log "error: $*"; exit 1; }

while (($#)); do
    case "$1" in
        --out-dir|--python-version|--platform|--wheelhouse)
            [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"
            case "$1" in
                --out-dir) OUT_DIR=$2 ;;
                --python-version) PYTHON_VERSION=$2 ;;
                --platform) PLATFORM=$2 ;;
                --wheelhouse) [[ -d "$2" ]] || die "--wheelhouse: no such directory: $2"
                              SOURCES=(--no-index --find-links "$(cd "$2" && pwd)") ;;
            esac
            shift 2 ;;
        -h|--help) sed -n '2,/^set -euo pipefail/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ "$PYTHON_VERSION" =~ ^3\.[0-9]+(\.[0-9]+)?$ ]] || die "--python-version: expected 3.X or 3.X.Y, got '$PYTHON_VERSION'"
UV=${UV:-$(command -v uv || true)}
[[ -n "$UV" && -x "$UV" ]] || die "uv not found: install it (pip install uv) or set UV to its path"
UV="$(cd "$(dirname "$UV")" && pwd)/$(basename "$UV")"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# Build from a copy of what the wheel is made of, so the build leaves nothing
# in the checkout and nothing else in it (virtualenvs, caches) can slip in.
mkdir -p "$WORK/src"
tar -C "$CHECKOUT" --exclude=__pycache__ --exclude='*.py[co]' -cf - pyproject.toml setup.cfg README.md poltergust |
    tar -C "$WORK/src" -xf -
COMMIT=$(git -C "$CHECKOUT" rev-parse HEAD 2>/dev/null || echo unknown)
if [[ "$COMMIT" != unknown ]] && [[ -n $(git -C "$CHECKOUT" status --porcelain -- poltergust setup.cfg pyproject.toml) ]]; then
    COMMIT="$COMMIT+changes"
    log "warning: the package has uncommitted changes; they are part of this release"
fi
SOURCE_DATE_EPOCH=$(git -C "$CHECKOUT" log -1 --format=%ct 2>/dev/null || echo 315532800)
export SOURCE_DATE_EPOCH

log "building the wheel"
"$UV" build --quiet "${SOURCES[@]}" --wheel --out-dir "$WORK/wheel" "$WORK/src"
WHEEL_PATH=$(find "$WORK/wheel" -name 'poltergust-*.whl')
[[ -f "$WHEEL_PATH" ]] || die "uv build made no poltergust wheel"
WHEEL=${WHEEL_PATH##*/}

# The lock: the wheel's own requirements, resolved for the VMs' Python.
python3 - "$WHEEL_PATH" >"$WORK/requirements.in" <<'EOF'
import email, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_bytes(wheel.read(name))
for requirement in metadata.get_all("Requires-Dist") or []:
    if "extra ==" not in requirement:
        print(requirement)
EOF
log "locking its dependencies for Python $PYTHON_VERSION on $PLATFORM"
(cd "$WORK" && "$UV" pip compile --quiet "${SOURCES[@]}" requirements.in --generate-hashes --only-binary :all: \
    --python-version "$PYTHON_VERSION" --python-platform "$PLATFORM" \
    --custom-compile-command "deploy/build-release.sh" --output-file requirements.lock)
grep -q -- '--hash=sha256:' "$WORK/requirements.lock" || die "the lock file has no hashes"

WHEEL_SHA=$(sha256 "$WHEEL_PATH")
LOCK_SHA=$(sha256 "$WORK/requirements.lock")
PACKAGE_VERSION=${WHEEL#poltergust-}
PACKAGE_VERSION=${PACKAGE_VERSION%%-*}
VERSION="$PACKAGE_VERSION-$(python3 -c 'import hashlib, sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest()[:12])' \
    "$WHEEL_SHA $LOCK_SHA")"

mkdir -p "$OUT_DIR/$VERSION"
cp "$WHEEL_PATH" "$WORK/requirements.lock" "$OUT_DIR/$VERSION/"
cat >"$OUT_DIR/$VERSION/release.json" <<EOF
{
  "version": "$VERSION",
  "wheel": "$WHEEL",
  "wheel_sha256": "$WHEEL_SHA",
  "lock": "requirements.lock",
  "lock_sha256": "$LOCK_SHA",
  "python_version": "$PYTHON_VERSION",
  "platform": "$PLATFORM",
  "commit": "$COMMIT"
}
EOF
cp "$OUT_DIR/$VERSION/release.json" "$OUT_DIR/release.json"
log "release $VERSION in $OUT_DIR/$VERSION (manifest: $OUT_DIR/release.json)"
printf '%s\n' "$VERSION"
