# UALM training image: NVIDIA's PyTorch container already ships CUDA, NCCL,
# TransformerEngine, apex and flash-attention built for it; we add megatron-core and the
# audio/IO packages, and install megatron_ualm itself without touching that torch.
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

# Fails the build if TransformerEngine/apex are missing from the base image.
RUN python -c "import transformer_engine, apex, megatron.core; print('TE', transformer_engine.__version__, '| mcore', megatron.core.__version__)"
