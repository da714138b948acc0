# JupyterLab with the workshop's labs.
#   docker build -t dl-at-scale .                                    # the learners' image (labs/, no solutions)
#   docker build --target instructor -t dl-at-scale:instructor .     # the same plus solutions/, served from the top
#   docker run --rm --shm-size=1g -p 8888:8888 -v dl-labs:/home/learner/workshop/labs dl-at-scale
#       prints http://127.0.0.1:8888/lab?token=... : open that URL. The named volume `dl-labs` keeps the learner's
#       notebooks across runs (Docker fills it from the image the first time); without -v, `--rm` loses them.
#   docker run ... -e JUPYTER_TOKEN=mysecret dl-at-scale              # a token of your choice (empty: a random one)
#   docker exec <container> jupyter server list                      # the URL again, with its token
# --shm-size=1g: MPICH takes about 5 MB of /dev/shm per rank (plus 2 MB for the library's shared window), so
# Docker's default 64 MB fails (SIGBUS, or a segfault) from about 10 ranks on, whatever the message size;
# `workshop check --ranks N` compares what N ranks need with what is free. tini is PID 1 (as `docker run
# --init`), so mpiexec, ipyparallel engines and their children are reaped and get Ctrl-C / `docker stop`.

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
RUN pip install -e ".[mpich]"

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
# No token on the command line: jupyter_server then takes JUPYTER_TOKEN, or (unset or empty) generates a random
# one and prints the URL with it; a token it did not generate it never prints.
ENV WORKSHOP_ROOT_DIR=labs
CMD ["sh", "-c", "exec jupyter lab --ServerApp.ip=0.0.0.0 --ServerApp.port=8888 --no-browser --ServerApp.root_dir=\"$WORKSHOP_ROOT_DIR\""]

# The instructor's image: the learners' plus the complete notebooks.
FROM runtime AS instructor
COPY --chown=learner:learner solutions ./solutions
ENV WORKSHOP_ROOT_DIR=.

# The default target (last stage): the learners' image.
FROM runtime AS learner
