#!/usr/bin/env bash
# Source this on the GPU machine (device tool) before a benchmark: installs the carried wheels
# (.whl, from ../shared/gpu/wheels.sh) into /tmp/site and unpacks Unsloth's site (.unsloth, from
# ../shared/gpu/unsloth-site.sh) into /tmp/usite, once per machine.
#   . bench/gpu_setup.sh && python3 bench/train_speed.py ...
if [ ! -f /tmp/site/.qlw-installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && touch /tmp/site/.qlw-installed || return 1
fi
if [ -f .unsloth/site.tar.xz ] && [ ! -d /tmp/usite/site ]; then
    python3 -c "import tarfile as t; t.open('.unsloth/site.tar.xz').extractall('/tmp/usite', filter='data')"
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
