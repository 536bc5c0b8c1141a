# The seed's pair: two images that differ only in their last RUN.
# Base (Debian bookworm minbase, via debootstrap):
#   layerfs bootstrap debian --suite bookworm
# Build (network needed for apt-get and pip):
#   layerfs build -f examples/numpy-matplotlib/Dockerfile.numpy -t py:numpy examples/numpy-matplotlib
#   layerfs build -f examples/numpy-matplotlib/Dockerfile.matplotlib -t py:matplotlib examples/numpy-matplotlib
#   layerfs history py:numpy; layerfs history py:matplotlib   # same ids up to the pip step
# Behind a TLS-intercepting proxy, put its CA certificates (*.crt) in ca/ first.
FROM debian:bookworm
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates && python3 -m venv /opt/venv
# pip's own CA bundle (certifi) does not know ca/; use the system one.
ENV PATH=/opt/venv/bin:$PATH PIP_CERT=/etc/ssl/certs/ca-certificates.crt
RUN pip install --no-cache-dir numpy
CMD ["python3", "-c", "import numpy; print(numpy.__version__)"]
