#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4) and NVIDIA's CuTe DSL for the device machine, which has neither and no package
# index (benchmarks/attention_fa4.py, IMAGESMITH_ATTENTION_BACKEND=fa4).
#
# Why two parts: a device call carries at most 64 MiB, and the DSL's compiler library alone is a 92 MB wheel
# (64 MB as xz of its unzipped files). So the DSL travels unzipped and xz-compressed, split in two:
#   here:    bash benchmarks/fa4_wheels.sh pack      -> .fa4/a (45 MB of the xz) and .fa4/b (the rest, small wheels)
#   call 1:  carry .fa4/a;  bash benchmarks/fa4_wheels.sh stash     (keeps it in .devcache/fa4 on the machine)
#   call 2:  carry .fa4/b;  bash benchmarks/fa4_wheels.sh install   (into /tmp/site, with the .whl wheels)
#            export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:...
# The second call must reach the same machine (chained at once: a machine idle 30 s goes back).
# The DSL's package adds dsl_packages to sys.path through a .pth file, which --target installs do not read:
# hence the second PYTHONPATH entry.
set -euo pipefail
FA4_VERSION=4.0.0b40
DSL_VERSION=4.8.1
case ${1:-} in
pack)
    rm -rf .fa4 && mkdir -p .fa4/a .fa4/b /tmp/fa4-pack && rm -rf /tmp/fa4-pack/*
    platform="--python-version 3.12 --implementation cp --only-binary=:all: --no-deps --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64"
    # shellcheck disable=SC2086  # platform is a list of arguments
    python3 -m pip download -q $platform -d /tmp/fa4-pack "flash-attn-4==$FA4_VERSION" \
        "nvidia-cutlass-dsl==$DSL_VERSION" "nvidia-cutlass-dsl-libs-base==$DSL_VERSION" \
        "nvidia-cutlass-dsl-libs-core==$DSL_VERSION" "nvidia-cutlass-dsl-libs-cu13==$DSL_VERSION" \
        "apache-tvm-ffi<0.2" torch-c-dlpack-ext quack-kernels==0.6.5 einops==0.8.1 "cuda-bindings>=13,<14" \
        cuda-pathfinder
    mkdir -p /tmp/fa4-pack/cu13
    (cd /tmp/fa4-pack/cu13 && python3 -m zipfile -e ../nvidia_cutlass_dsl_libs_cu13-*.whl .)
    rm /tmp/fa4-pack/nvidia_cutlass_dsl_libs_cu13-*.whl
    tar cf - -C /tmp/fa4-pack/cu13 . | xz -T2 -9 > /tmp/fa4-pack/cu13.tar.xz
    split -b 45000000 /tmp/fa4-pack/cu13.tar.xz /tmp/fa4-pack/cu13.part-
    mv /tmp/fa4-pack/cu13.part-aa .fa4/a/ && mv /tmp/fa4-pack/cu13.part-ab .fa4/b/
    mv /tmp/fa4-pack/*.whl .fa4/b/
    du -sh .fa4/a .fa4/b
    ;;
stash)
    mkdir -p .devcache/fa4 && cp .fa4/a/cu13.part-aa .devcache/fa4/
    ;;
install)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .fa4/b/*.whl
    cat .devcache/fa4/cu13.part-aa .fa4/b/cu13.part-ab | xz -d | tar xf - -C /tmp/site
    ;;
*)
    echo "usage: bash benchmarks/fa4_wheels.sh pack|stash|install" >&2
    exit 2
    ;;
esac
