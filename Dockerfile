# flashsale: the API, the persister, migrations and the locust scenarios, in one image.
#   docker build -t flashsale .
#   docker run --rm flashsale --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLASHSALE_DATA_DIR=/data \
    FLASHSALE_KEYS_DIR=/keys

WORKDIR /app
# README.m[d]: the pattern lets the build go on in a checkout without a README yet.
COPY pyproject.toml README.m[d] ./
COPY engine ./engine
COPY lua ./lua
COPY database ./database
COPY api ./api
COPY persister ./persister
COPY verifier ./verifier
COPY flashsale ./flashsale
COPY loadtest ./loadtest
# The project, and locust for the load-test service (same image, another entrypoint).
RUN pip install . "locust>=2.32"

# Never root. /data and /keys become volumes that inherit this ownership; /keys is
# shared by every API replica (voucher signing keys, rotated with `flashsale keys rotate`).
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin flashsale \
    && mkdir -p /data /keys \
    && chown flashsale:flashsale /data /keys \
    && chmod 0700 /keys
USER flashsale

EXPOSE 8000
ENTRYPOINT ["flashsale"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
