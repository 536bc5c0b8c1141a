#!/usr/bin/env bash
# Install what layerfs needs on a Debian/Ubuntu machine, as root, then a
# virtual environment with the package. Idempotent: installs only what is
# missing. Usage: scripts/setup.sh [runtime|test]
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-runtime}

runtime_pkgs=(fuse3 libfuse3-dev pkg-config busybox-static gcc python3-venv python3-dev debootstrap zstd attr)
# The tests drive the real tools the issues name, side by side with layerfs.
test_pkgs=(fuse-overlayfs runc crun skopeo umoci buildah docker-registry containerd fio apache2-utils acl)

pkgs=("${runtime_pkgs[@]}")
[ "$what" = test ] && pkgs+=("${test_pkgs[@]}")

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing packages ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "setup: apt-get install ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# docker-registry's and containerd's packages start services (the
# registry on every interface); the tests start their own instances on
# 127.0.0.1 and temp sockets, so keep the packaged ones off.
for svc in docker-registry containerd; do
  if command -v systemctl >/dev/null && systemctl is-active -q "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$what
newer() { for f in pyproject.toml setup.py layerfs/fs/_lowlevel.c bin/layerfs.c; do [ "$f" -nt "$stamp" ] && return 0; done; return 1; }
if [ ! -f "$stamp" ] || newer; then
  extra=""
  [ "$what" = test ] && extra="[test]"
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e ".$extra"
  touch "$stamp"
fi
