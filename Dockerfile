# The image of every Ray pod, head and TPU workers alike: Ray 2.60 (the version the project pins),
# JAX with TPU support (libtpu comes from PyPI as a jax[tpu] dependency), and this project (app/,
# model/, kuberay/) installed, so the RayService imports app.builder:build_app with no runtime_env.
#   docker build -t gptj-serve:latest .
# On the head, JAX_PLATFORMS=cpu (set in the manifest) keeps jax off the accelerator; libtpu is
# only used on the TPU hosts.
FROM rayproject/ray:2.60.0-py311

# rayproject images run as user `ray` (uid 1000, gid 100); the pods enforce runAsNonRoot with it.
USER 1000:100
RUN mkdir -p /home/ray/gptj-serve
WORKDIR /home/ray/gptj-serve

# Dependencies first, so a code change does not reinstall them.
COPY --chown=1000:100 pyproject.toml README.md ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
 && pip install --no-cache-dir "jax[tpu]>=0.10,<0.12" -r /tmp/requirements.txt

COPY --chown=1000:100 app ./app
COPY --chown=1000:100 model ./model
COPY --chown=1000:100 kuberay ./kuberay
COPY --chown=1000:100 bench ./bench
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import app.args, kuberay.drain, model.nn.config, jax; print('jax', jax.__version__)"
