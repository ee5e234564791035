#!/usr/bin/env bash
# The wheels a device call carries (run's carry [".whl"]): the device machine has torch 2.11, transformers,
# accelerate and safetensors for Python 3.12, but not diffusers nor this project's server parts, and it reaches
# no index. Downloads them into .whl (ignored by git) from this machine's package mirror.
#
# On the device, first thing in the command:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#     .whl/*.whl && export PYTHONPATH=/tmp/site:src:benchmarks TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
# nvidia-cudnn-frontend is for IMAGESMITH_FP8_CONVS (the fp8 convolutions, docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
rm -rf .whl
"$PIP" download -q --no-deps -d .whl --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --only-binary=:all: \
  diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
  pydantic-settings==2.16.3 python-dotenv importlib-metadata zipp "typing-extensions>=4.16" \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 opentelemetry-api nvidia-cudnn-frontend==1.16.0
ls .whl
