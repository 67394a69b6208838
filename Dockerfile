# UALM training image: NVIDIA's PyTorch container (Python 3.12, CUDA, NCCL, triton) plus
# megatron-core and the audio/IO packages; megatron_ualm itself is installed without touching
# that torch. On Python 3.12 pip resolves setup.py's megatron-core range to its newest release
# (0.19.x), which CI tests on every change beside 0.16.1. TransformerEngine, apex and
# flash-attention, which the container also ships, are optional: the code detects them.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

RUN apt-get update && apt-get install -y --no-install-recommends ffmpeg libsndfile1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/megatron_ualm
COPY setup.py README.md ./
COPY megatron_ualm ./megatron_ualm
# Keep the image's torch: pin it for this install so no requirement can replace it.
RUN python -c "import torch; print('torch==' + torch.__version__)" > /tmp/torch-constraint.txt \
    && pip install --no-cache-dir -c /tmp/torch-constraint.txt -e ".[logging]"
COPY data_tools ./data_tools
COPY checkpoints_convert ./checkpoints_convert
COPY examples ./examples
COPY slurm ./slurm

# Fails the build unless what the code needs is there: Python 3.12, a CUDA torch, triton (the
# fused kernels; megatron-core 0.19 imports it), a supported megatron-core, and the package.
RUN python -c "import sys, torch, triton, megatron.core, megatron_ualm.train; \
assert sys.version_info[:2] == (3, 12), sys.version; assert torch.version.cuda, 'CPU-only torch'; \
print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, \
      '| megatron-core', megatron.core.__version__)"
