# JupyterLab with the workshop's labs.
#   docker build -t dl-at-scale .                                    # the learners' image (labs/, no solutions)
#   docker build --target instructor -t dl-at-scale:instructor .     # the same plus solutions/
#   docker run --rm --shm-size=1g -p 8888:8888 dl-at-scale           # prints the URL with a random token
#   docker run --rm --shm-size=1g -p 8888:8888 -e JUPYTER_TOKEN=... dl-at-scale
# --shm-size=1g: Docker's default /dev/shm is 64 MB, and MPI's shared-memory transport then fails with SIGBUS
# on large messages (`workshop check` prints the size). tini is PID 1 (as `docker run --init` would do), so
# mpiexec, ipyparallel engines and their children are reaped and get Ctrl-C / `docker stop`.

# A pinned base image: the Python minor and patch version and the Debian release, never `latest`.
FROM python:3.11.11-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WORKSHOP_DATA=/home/learner/workshop/data

RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --shell /bin/bash learner \
    && install -d -o learner -g learner /home/learner/workshop
WORKDIR /home/learner/workshop
COPY --chown=learner:learner pyproject.toml README.md ./
COPY --chown=learner:learner workshop_lib ./workshop_lib
# editable: `workshop bench` finds benchmarks/ beside the package, numba caches beside it as the learner
RUN pip install -e .

# The labs are generated from solutions/ as the learner, in a stage of their own: solutions stay out of the image.
FROM base AS labs
COPY --chown=learner:learner solutions ./solutions
USER learner
RUN workshop build-labs --solutions solutions --labs labs

FROM base AS runtime
COPY --chown=learner:learner data ./data
COPY --chown=learner:learner benchmarks ./benchmarks
COPY --chown=learner:learner cluster ./cluster
COPY --from=labs --chown=learner:learner /home/learner/workshop/labs ./labs
USER learner
EXPOSE 8888
ENTRYPOINT ["/usr/bin/tini", "--"]
# An empty token would leave the server open: generate one unless the user set JUPYTER_TOKEN.
CMD ["sh", "-c", "exec jupyter lab --ServerApp.ip=0.0.0.0 --ServerApp.port=8888 --no-browser --ServerApp.root_dir=labs --IdentityProvider.token=\"${JUPYTER_TOKEN:-$(python -c 'import secrets; print(secrets.token_hex(24))')}\""]

# The instructor's image: the learners' plus the complete notebooks.
FROM runtime AS instructor
COPY --chown=learner:learner solutions ./solutions

# The default target (last stage): the learners' image.
FROM runtime AS learner
