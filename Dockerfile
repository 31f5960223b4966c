# The training image: CUDA PyTorch 2.14.1 (the version pinned in requirements.txt) plus this toolkit.
#   docker build -t vit-toolkit .
#   docker run --rm --gpus all vit-toolkit                                   # python train.py --config config.yaml
#   docker run --rm --gpus all -v $PWD/out:/out vit-toolkit checkpoint.dir=/out/ckpt log.dir=/out/logs
#   docker run --rm --gpus all --shm-size 1g vit-toolkit --num-gpus 2        # every argument is appended
# Arguments after the image name are appended to the entrypoint: flags and key.sub=value overrides,
# environment=k8s among them. Kubernetes `args:` do the same; `command:` replaces the entrypoint
# (the elastic PyTorchJob runs torchrun that way).
#
# The tag follows the official naming (<torch>-cuda<X.Y>-cudnn<N>-runtime) for the cu130 build that
# requirements.txt resolves to; the build stops below if the base holds another torch. If a registry
# lacks the tag, pass another CUDA base of the same torch:
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime -t vit-toolkit .
ARG BASE_IMAGE=pytorch/pytorch:2.14.1-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

WORKDIR /workspace

# torch and torchvision come from the base image (its CUDA build); pip would otherwise fetch the
# default wheels again. The rest is installed at the pinned versions.
COPY requirements.txt .
RUN grep -vE '^(torch|torchvision)==' requirements.txt > /tmp/requirements-rest.txt \
 && pip install -r /tmp/requirements-rest.txt \
 && python -c "import torch, torchvision; \
v = (torch.__version__.split('+')[0], torchvision.__version__.split('+')[0]); \
assert v == ('2.14.1', '0.29.1'), f'base image has torch/torchvision {v}, requirements.txt pins 2.14.1/0.29.1'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Code, config, the presets and the shipped MNIST (so the default job runs with no network and no
# volume). tests/test_image.py builds this file tree from these COPY lines and runs the entrypoint in it.
COPY config.yaml *.py ./
COPY configs/ ./configs/
COPY data/MNIST/raw/ ./data/MNIST/raw/
COPY test_digit/ ./test_digit/

ENTRYPOINT ["python", "train.py", "--config", "config.yaml"]
CMD []
