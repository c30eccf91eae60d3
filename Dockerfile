# prscd node image: slim, non-root, health-checked.
#   docker build -t prscd .
#   docker run -p 127.0.0.1:8443:8443/tcp -p 127.0.0.1:8443:8443/udp prscd
FROM python:3.11-slim AS build
WORKDIR /src
# Dependencies first, as their own layer: a change to the code does not download them
# again (the list is read from pyproject.toml, so it cannot drift from it).
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['fast']))" > requirements.txt \
 && pip install --no-cache-dir --prefix=/install -r requirements.txt
COPY README.md ./
COPY node ./node
COPY mesh ./mesh
RUN pip install --no-cache-dir --no-deps --prefix=/install '.[fast]'

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --create-home --uid 10001 prscd \
 && mkdir /certs && chown prscd /certs
# /certs: where docker-compose shares one dev certificate between nodes (a named volume
# takes this directory's owner, so the non-root user can write it).
USER prscd
WORKDIR /home/prscd
ENV PORT=8443 \
    CERT_CACHE_DIR=/home/prscd/.cache/prscd \
    PID_FILE=/home/prscd/prscd.pid \
    PYTHONUNBUFFERED=1
# WebSocket + HTTP on TCP, WebTransport (HTTP/3) on UDP, same number.
EXPOSE 8443/tcp 8443/udp
# /health answers 200 while the process serves; the edge should watch /ready instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os,ssl,urllib.request as u; c=ssl._create_unverified_context(); s='https' if os.environ.get('TLS','true').lower() not in ('0','false','no','off') else 'http'; u.urlopen(f\"{s}://127.0.0.1:{os.environ.get('PORT','8443')}/health\", context=c if s=='https' else None, timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["prscd"]
