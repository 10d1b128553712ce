# syntax=docker/dockerfile:1
#
# kd-stack container image. Two stages:
#   devel   - builds wheels: flash-attn and DeepSpeed with its CUDA ops precompiled for sm_90 (H100/H200)
#   runtime - the project, installed editable from /opt/kd-stack, OpenMPI + mpi4py, a non-root user,
#             ENTRYPOINT kd-train
#
# GPU image (the defaults):
#   docker build -t kd-stack:gpu .
# CPU image (no CUDA build; any Debian/Ubuntu base with apt):
#   docker build -t kd-stack:cpu --build-arg VARIANT=cpu \
#     --build-arg BASE_IMAGE=debian:bookworm-slim --build-arg RUNTIME_IMAGE=debian:bookworm-slim \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# or with torch from a folder of wheels mounted at build time (buildah only; scripts/image/image-test.sh):
#   buildah build ... --volume /opt/wheels:/torch-wheels:ro --build-arg TORCH_FIND_LINKS=/torch-wheels .
#
# Versions are pinned here, once. TORCH_VERSION, DEEPSPEED_VERSION and TRANSFORMERS_VERSION must equal
# pyproject.toml's pins and FLASH_ATTN_VERSION must satisfy its `gpu` extra: tests/unit/test_dockerfile.py
# checks that, and pip fails the build on a disagreement too (the pins are installed together with
# pyproject's requirements). CUDA_VERSION's major.minor must match the wheel index (cu130 = CUDA 13.0):
# torch 2.13.0's CUDA wheels are built with CUDA 13.0, and extensions must be compiled with the same major.
ARG VARIANT=gpu
ARG CUDA_VERSION=13.0.1
ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-devel-ubuntu24.04
ARG RUNTIME_IMAGE=nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# a folder of wheels (inside the build) to take torch from instead of TORCH_INDEX_URL; empty: the index
ARG TORCH_FIND_LINKS=
ARG DEEPSPEED_VERSION=0.19.8
ARG TRANSFORMERS_VERSION=5.23.0
ARG FLASH_ATTN_VERSION=2.8.3.post2
# Hopper only (H100/H200); "9.0;10.0" adds Blackwell at twice the compile time
ARG TORCH_CUDA_ARCH_LIST=9.0
ARG FLASH_ATTN_CUDA_ARCHS=90
# parallel nvcc jobs for flash-attn: each takes several GB of memory
ARG MAX_JOBS=4

# ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS devel
ARG VARIANT
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG DEEPSPEED_VERSION
ARG FLASH_ATTN_VERSION
ARG TORCH_CUDA_ARCH_LIST
ARG FLASH_ATTN_CUDA_ARCHS
ARG MAX_JOBS
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN case "$VARIANT" in gpu|cpu) ;; *) echo "VARIANT must be gpu or cpu, not '$VARIANT'" >&2; exit 1;; esac; \
    apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && if [ "$VARIANT" = gpu ]; then \
        apt-get install -y --no-install-recommends python3-dev build-essential ninja-build git; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && mkdir /opt/kd-wheels

# setuptools and wheel: DeepSpeed's sdist builds with setup.py (no pyproject.toml). GPU: also torch
# (both extensions compile against it) and flash-attn's build requirements.
# hadolint ignore=DL3013
RUN pip install setuptools wheel \
    && if [ "$VARIANT" = gpu ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
        && pip install packaging psutil ninja; \
    fi

# flash-attn from source for sm_90 only (FORCE_BUILD: never its prebuilt-wheel download)
RUN if [ "$VARIANT" = gpu ]; then \
        FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS="$FLASH_ATTN_CUDA_ARCHS" MAX_JOBS="$MAX_JOBS" NVCC_THREADS=2 \
        pip wheel --no-build-isolation --no-deps --wheel-dir /opt/kd-wheels "flash-attn==${FLASH_ATTN_VERSION}"; \
    fi

# DeepSpeed. GPU: the CUDA ops precompiled (no JIT build, so no compiler in the runtime image). There is
# no GPU during a build, so DS_ACCELERATOR=cuda names the target (DeepSpeed would fall back to CPU ops).
# kd-train itself calls no DeepSpeed op (the trainer passes a torch AdamW); fused_adam, DeepSpeed's GPU
# Adam, is precompiled so that a DeepSpeed optimizer never JIT-compiles in the image. cpu_adam is left
# out on purpose: DeepSpeed compiles it with -march=native of the build machine. CPU: a plain wheel.
RUN if [ "$VARIANT" = gpu ]; then \
        DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
        pip wheel --no-build-isolation --no-deps --wheel-dir /opt/kd-wheels "deepspeed==${DEEPSPEED_VERSION}"; \
    else \
        DS_BUILD_OPS=0 pip wheel --no-build-isolation --no-deps --wheel-dir /opt/kd-wheels "deepspeed==${DEEPSPEED_VERSION}"; \
    fi \
    && ls -l /opt/kd-wheels

# ---------------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
ARG VARIANT
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ARG TORCH_FIND_LINKS
ARG DEEPSPEED_VERSION
ARG TRANSFORMERS_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1

# OpenMPI for mpirun and mpi4py (its PyPI wheel loads the system libmpi); no compiler
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates openmpi-bin \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first and alone, at the pinned version, so that no other package pulls in another build of it
RUN if [ -n "$TORCH_FIND_LINKS" ]; then \
        pip install --no-index --no-deps --find-links "$TORCH_FIND_LINKS" "torch==${TORCH_VERSION}" \
        && pip install "torch==${TORCH_VERSION}"; \
    else \
        pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi

# the wheels built above, then pyproject's requirements (with the mpi extra, and gpu on GPU) before the
# source, so that a source change does not reinstall them
COPY --from=devel /opt/kd-wheels /tmp/kd-wheels
COPY pyproject.toml /tmp/kd-stack/pyproject.toml
RUN set -- mpi; if [ "$VARIANT" = gpu ]; then set -- mpi gpu; fi; \
    python -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; \
print("\n".join(p["dependencies"] + [r for e in sys.argv[2:] for r in p["optional-dependencies"][e]]))' \
        /tmp/kd-stack/pyproject.toml "$@" > /tmp/requirements.txt \
    && pip install /tmp/kd-wheels/*.whl \
    && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}" "deepspeed==${DEEPSPEED_VERSION}" \
        "transformers==${TRANSFORMERS_VERSION}" \
    && rm -rf /tmp/kd-wheels /tmp/kd-stack /tmp/requirements.txt

# set here rather than last: each instruction after the source COPY is one more layer to commit on a
# source change (several seconds each; a minute each on buildah's vfs store)
ENTRYPOINT ["kd-train"]

# the user it runs as: kd, uid and gid 1000 (ubuntu:24.04's own user "ubuntu" holds 1000: removed first)
RUN existing="$(getent passwd 1000 | cut -d: -f1)"; \
    if [ -n "$existing" ]; then userdel --remove "$existing"; fi; \
    useradd --create-home --uid 1000 --user-group --shell /bin/bash kd

# The project, editable from a copy of its source tree: it finds ds_configs/ and recipes/ beside its
# packages, and recipes name paths relative to where kd-train runs (runs/...). The tree stays root's;
# runs/ is the user's (mount a volume there to keep the runs).
WORKDIR /opt/kd-stack
COPY . /opt/kd-stack
RUN pip install --no-deps -e . \
    && python -m compileall -q kd train tools \
    && install -d -o kd -g kd runs \
    && pip check \
    && python -c 'import sys, torch; cuda = torch.version.cuda; print("torch", torch.__version__, "cuda", cuda); \
sys.exit(0 if (cuda is not None) == (sys.argv[1] == "gpu") and torch.__version__.split("+")[0] == sys.argv[2] else 1)' \
        "$VARIANT" "$TORCH_VERSION"

USER 1000:1000
