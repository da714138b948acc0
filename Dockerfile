# JupyterLab with the workshop's labs.
#   docker build -t dl-at-scale .
#   docker run --rm -p 8888:8888 dl-at-scale            # prints the URL with a random token
#   docker run --rm -p 8888:8888 -e JUPYTER_TOKEN=... dl-at-scale
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WORKSHOP_DATA=/home/learner/workshop/data

RUN useradd --create-home --shell /bin/bash learner
WORKDIR /home/learner/workshop
COPY --chown=learner:learner . .
RUN pip install . && workshop build-labs

USER learner
EXPOSE 8888
# An empty token would leave the server open: generate one unless the user set JUPYTER_TOKEN.
CMD ["sh", "-c", "exec jupyter lab --ServerApp.ip=0.0.0.0 --ServerApp.port=8888 --no-browser --ServerApp.root_dir=labs --IdentityProvider.token=\"${JUPYTER_TOKEN:-$(python -c 'import secrets; print(secrets.token_hex(24))')}\""]
