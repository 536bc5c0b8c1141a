#!/usr/bin/env bash
# The main job, end to end, on the default store (LAYERFS_ROOT or
# /var/lib/layerfs): a base image, two images sharing it, what that saves.
set -euo pipefail
cd "$(dirname "$0")/.."
L=.venv/bin/layerfs
work=$(mktemp -d)
cleanup() {
  mountpoint -q "$work/mnt" 2>/dev/null && $L umount "$work/mnt"
  for i in 1 2 3 4 5; do $L rm -f "demo-c$i" >/dev/null 2>&1 || true; done
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# A re-run replaces the demo's images and containers instead of piling up.
for i in 1 2 3 4 5; do $L rm -f "demo-c$i" >/dev/null 2>&1 || true; done
for old in demo/web:1 demo/worker:1 pair:first pair:second; do $L rmi "$old" >/dev/null 2>&1 || true; done
$L gc >/dev/null

step "A base image from the host's static busybox"
$L bootstrap busybox -t busybox:latest

step "Two images on that base; both add the same 4 MB library plus a file of their own"
.venv/bin/python -c "import random,sys; random.seed(7); sys.stdout.buffer.write(random.randbytes(4000000))" > "$work/libshared.so"
for app in web worker; do
  mkdir -p "$work/$app/usr/lib" "$work/$app/app"
  cp "$work/libshared.so" "$work/$app/usr/lib/"
  echo "#!/bin/sh
echo I am $app" > "$work/$app/app/run.sh"
  chmod +x "$work/$app/app/run.sh"
  $L import "$work/$app" --base busybox:latest --layer -t "demo/$app:1" -m "add $app"
done

step "Images"
$L images

step "History: both images start with the same busybox layer id"
$L history demo/web:1
$L history demo/worker:1

step "Storage: docker shares the base layer; layerfs also stores the library once"
$L df -v


step "Mount an image as a filesystem; writes land in a copy-on-write upper dir"
mnt="$work/mnt"; upper="$work/upper"
mkdir -p "$mnt"
$L mount demo/web:1 "$mnt" --upper "$upper"
$L mounts
chroot "$mnt" sh -c 'echo "written in the container" > /app/note; rm /bin/ls; /app/run.sh'
echo "upper dir now holds only the changes (a 0/0 char device is a whiteout):"
(cd "$upper" && find . -mindepth 1 -printf '%y %M %p\n' | sort)
$L umount "$mnt"

step "Build two images from Dockerfiles that share all but their last step"
$L build -f examples/busybox-pair/Dockerfile.first -t pair:first examples/busybox-pair
$L build -f examples/busybox-pair/Dockerfile.second -t pair:second examples/busybox-pair
echo "history: the same layer ids up to the last step"
$L history pair:first
$L history pair:second
$L run --rm pair:second

step "Run a container (namespaces, cgroups, pivot_root into a layerfs mount)"
$L run --rm --memory 64m --pids-limit 64 demo/web:1 sh -c '/app/run.sh; echo "pid $$ on $(hostname)"; ls /'

step "Five containers from one image: the image's bytes once, plus five thin upper dirs"
for i in 1 2 3 4 5; do
  $L run -d --name "demo-c$i" demo/web:1 sh -c "echo container $i > /app/state; head -c 100000 /dev/urandom > /app/scratch; sleep 600" >/dev/null
done
$L ps
$L df -v
for i in 1 2 3 4 5; do $L rm -f "demo-c$i" >/dev/null; done

step "Integrity: every object re-hashed, every reference resolved"
$L fsck
