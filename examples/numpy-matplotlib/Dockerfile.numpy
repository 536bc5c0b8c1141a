# The seed's pair: two images that differ only in their last RUN.
# Base (Debian bookworm minbase, via debootstrap):
#   layerfs bootstrap debian --suite bookworm
# Build (network needed for apt-get and pip; behind a TLS-intercepting proxy
# the --secret hands pip the host's CA bundle, see README.md):
#   layerfs build --secret id=cacert,src=/etc/ssl/certs/ca-certificates.crt \
#       -f examples/numpy-matplotlib/Dockerfile.numpy -t py:numpy examples/numpy-matplotlib
#   layerfs history py:numpy; layerfs history py:matplotlib   # same ids up to the pip step
FROM debian:bookworm
# apt's downloads and package lists persist in cache mounts across builds and
# stay out of the layer.
RUN --mount=type=cache,target=/var/cache/apt,sharing=locked \
    --mount=type=cache,target=/var/lib/apt/lists,sharing=locked \
    apt-get update && apt-get install -y --no-install-recommends python3 python3-venv
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CA bundle, if given, is trusted by pip for this step only (pip's own
# bundle, certifi, does not know a proxy's CA); it is never in the image,
# its history or the cache key, so builds with and without it share layers.
RUN --mount=type=secret,id=cacert --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi; \
    pip install numpy
CMD ["python3", "-c", "import numpy; print(numpy.__version__)"]
