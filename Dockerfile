# One image for every cliptuner service: the whole Flow (default), or one Executor as its own microservice.
#
#   docker build -t cliptuner .
#   cliptuner keys create --role admin --name ci --keys-file keys/keys.json && sudo chown -R 10001 keys
#   docker run -p 51000:51000 -v $PWD/workspace:/workspace -v $PWD/keys:/etc/cliptuner/keys:ro cliptuner
#                                                                                    # the Flow (gRPC :51000)
#   docker run -p 51001:51001 -v $PWD/workspace:/workspace cliptuner \
#       jina executor --uses config.yml --port 51001 --workspace /workspace            # the encoder alone
#
# The service runs as the unprivileged user `cliptuner` (uid 10001), which owns /workspace; a bind-mounted host
# folder must be writable by it (`sudo chown -R 10001 workspace`). Inside the container the gateway listens on
# every interface (CLIPTUNER_HOST=0.0.0.0) and the Flow's Executors on 127.0.0.1: what is reachable from
# outside is what `-p` publishes.
#
# API keys: the gateway requires them. CLIPTUNER_KEYS_FILE names /etc/cliptuner/keys/keys.json, so mount a keys
# file there (`-v $PWD/keys.json:/etc/cliptuner/keys/keys.json:ro`, or the folder as above), readable by uid
# 10001 (`cliptuner keys` writes it readable by its owner only). Without it the service stops at start with
# "keys file '/etc/cliptuner/keys/keys.json' is missing". A mounted folder also shows later `cliptuner keys
# create/revoke` to the running gateway (a single-file mount keeps the file as it was when the container
# started). To serve without keys, open to whoever reaches the port:
#   docker run -e CLIPTUNER_KEYS_FILE= -e CLIPTUNER_INSECURE_NO_AUTH=1 -p 51000:51000 ... cliptuner
#
# GPU image: build with --build-arg "ORT=onnxruntime-gpu[cuda,cudnn]" (ONNX Runtime's CUDA build and the CUDA and
# cuDNN libraries it loads, registered with ldconfig below: python:3.11-slim has none) and run with --gpus all. Its
# CUDA major must be one the host's NVIDIA driver supports; pin a version in ORT to choose it.
#
# Kubernetes (flows/k8s.yml, `cliptuner k8s`) runs each Executor from its own image, as
# `jina executor --uses config.yml`; build one per Executor, EXECUTOR naming the class that its config.yml loads.
# The gateway runs `jina gateway --uses CLIPGateway --py-modules /app/executors/__init__.py` from an image of its
# own (config.yml unused). The serving images leave out the training extra (TRAIN=0: no torch, torchvision,
# open_clip, onnx):
#   docker build --build-arg EXECUTOR=CLIPTuner                 -t cliptuner-tuner .
#   docker build --build-arg EXECUTOR=CLIPEncoder --build-arg TRAIN=0 -t cliptuner-encoder .
#   docker build --build-arg EXECUTOR=CLIPIndexer --build-arg TRAIN=0 -t cliptuner-indexer .
#   docker build --build-arg TRAIN=0                            -t cliptuner-gateway .
# tagged with the package's version (`cliptuner k8s` pins the images to it: cliptuner-encoder:0.1.0 ...), and for
# pods that reserve GPUs (`cliptuner k8s --gpus-encoder N`, --gpus-tuner) the -gpu variant of the image:
#   docker build --build-arg EXECUTOR=CLIPEncoder --build-arg TRAIN=0 --build-arg "ORT=onnxruntime-gpu[cuda,cudnn]" \
#       -t cliptuner-encoder:0.1.0-gpu .
FROM python:3.11-slim

ARG ORT=onnxruntime
ARG EXECUTOR=CLIPEncoder
# 1: with the training extra (the whole Flow, the tuner); 0: serving only (encoder, indexer, gateway)
ARG TRAIN=1
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    JINA_HIDE_SURVEY=1 \
    JINA_OPTOUT_TELEMETRY=1 \
    CLIPTUNER_HOST=0.0.0.0 \
    CLIPTUNER_PORT=51000 \
    CLIPTUNER_WORKSPACE=/workspace \
    CLIPTUNER_KEYS_FILE=/etc/cliptuner/keys/keys.json \
    CLIPTUNER_MODEL=cliptuner-tiny \
    CLIPTUNER_PRETRAINED= \
    CLIPTUNER_DEVICE=auto

WORKDIR /app
COPY pyproject.toml README.md ./
COPY cliptuner ./cliptuner
COPY executors ./executors
RUN if [ "$TRAIN" = 1 ]; then pip install ".[train]"; else pip install .; fi \
    && if [ "$ORT" != "onnxruntime" ]; then \
        pip uninstall -y onnxruntime && pip install "$ORT" \
        && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
        && { find "$site/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null || true; } | sort -u \
            > /etc/ld.so.conf.d/cliptuner-cuda.conf \
        && ldconfig; \
    fi
COPY flows ./flows
COPY config.yml ./
RUN sed -i "s/^jtype: .*/jtype: ${EXECUTOR}/" config.yml

# the code in /app stays root's (read-only to the service); the service writes only the workspace and its home
RUN useradd --create-home --uid 10001 --user-group cliptuner && mkdir -p /workspace \
    && chown cliptuner:cliptuner /workspace
USER cliptuner
VOLUME /workspace
EXPOSE 51000
CMD ["cliptuner", "serve", "--flow", "flows/flow.yml"]
