# raysemi's cluster image: the Ray GPU image of the pinned Ray version, plus the CUDA builds of torch and DALI
# and raysemi itself. Every Ray node (cluster launcher head/workers, KubeRay pods) runs this one image, so the
# job driver, the Ray Train workers and the pseudo-labelling actors all see the same code and versions.
#
#   docker build -t ghcr.io/raysemi/raysemi:0.1.0-ray2.60.0-py311-cu128 .
#
# Tag scheme: <raysemi version>-ray<Ray version>-<base image's python/CUDA tag>. tests/test_clusters.py checks
# that this file, clusters/*.yaml and clusters/k8s/*.yaml agree with pyproject.toml and constraints.txt.
#
# CUDA: the base is Ray's CUDA 12.8 image (the `ray-ml` images are no longer published). torch 2.14.1's Linux
# wheels on PyPI are CUDA 13.0 builds that carry their own CUDA libraries (the nvidia-*-cu13 pins in
# constraints.txt); DALI's nvidia-dali-cuda120 wheel carries its CUDA 12 libraries. Neither uses the base's
# CUDA runtime, so what the nodes need is an NVIDIA driver that runs CUDA 13.0 code: R580 or newer.
FROM rayproject/ray:2.60.0-py311-cu128

LABEL org.opencontainers.image.title="raysemi" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="Semi-supervised medical image classification on Ray (BYOL + pseudo-labels)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="rayproject/ray:2.60.0-py311-cu128"

# The Ray image runs as the unprivileged user `ray` (uid 1000, gid 100 `users`) with its Python 3.11 on PATH;
# we keep both (numeric, so that the host and Kubernetes runAsNonRoot can check it).
USER 1000:100
WORKDIR /home/ray/raysemi
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. The heavy, rarely changing layer: the exact versions CI tests (constraints.txt), CUDA builds of torch and
#    DALI. Ray itself is already in the base image and constraints.txt pins the same 2.60.0, so pip keeps it.
COPY --chown=1000:100 constraints.txt ./
RUN pip install --no-cache-dir -c constraints.txt \
        torch==2.14.1 \
        torchvision==0.29.1 \
        nvidia-dali-cuda120==2.4.0 \
    && python -c "import ray; assert ray.__version__ == '2.60.0', ray.__version__"

# 2. raysemi itself, with the DALI extra, under the same constraints. The configs, search spaces and
#    .rayignore stay in the working directory so that `raysemi run --config configs/covid19.yaml` works as is
#    (RayJob entrypoints and `ray job submit` without --working-dir).
COPY --chown=1000:100 pyproject.toml README.md .rayignore ./
COPY --chown=1000:100 raysemi ./raysemi
COPY --chown=1000:100 configs ./configs
COPY --chown=1000:100 tune_spaces ./tune_spaces
RUN pip install --no-cache-dir -c constraints.txt ".[dali]" \
    && raysemi --help > /dev/null \
    && python -c "import ray, torch, torchvision, nvidia.dali, raysemi; print('ray', ray.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"
