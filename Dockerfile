# syntax=docker/dockerfile:1
# The image the Helm chart (k8s/avatarserve) runs: Ray 2.60 (rayproject/ray) + AvatarServe + its client SDK.
# The toy model's weights ship inside the package (services/avatarserve/weights/toy), so the CPU profile needs
# nothing else; real checkpoints are mounted at run time (values-*-gpu.yaml: /models).
#
#   CPU:   docker build -t avatarserve:0.1.0 .
#   CUDA:  docker build -t avatarserve:0.1.0-cu128 \
#            --build-arg RAY_IMAGE_TAG=2.60.0-py311-cu128 \
#            --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#
# RAY_IMAGE_TAG must keep Ray at the version pyproject.toml pins (ray[serve]==2.60.0) and the chart's
# head.rayVersion; tests/k8s checks the three agree.
ARG RAY_IMAGE_TAG=2.60.0-py311
FROM rayproject/ray:${RAY_IMAGE_TAG}

# torch from the index matching the base image (CPU wheels by default; a CUDA index for the -cuXXX images).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

WORKDIR /home/ray/avatarserve
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The client distribution first (avatarserve-client is not on PyPI; the server depends on it), then the server.
COPY --chown=ray:users clients/python clients/python
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users services services
RUN pip install --no-cache-dir ./clients/python . \
 && python -c "import importlib.resources as res, ray, avatarserve, avatarserve_client; \
toy = res.files('avatarserve') / 'weights' / 'toy'; \
assert (toy / 'diffusion_pytorch_model.safetensors').is_file(), 'toy weights missing from the package'; \
assert ray.__version__ == '2.60.0', ray.__version__"

# KubeRay starts Ray itself (`ray start` in the container's command); nothing to run here.
WORKDIR /home/ray
