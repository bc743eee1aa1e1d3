# Source this on a GPU machine without network access before running the GPU benches or tests:
#
#   source bench/offline_gpu_env.sh WHEELS_DIR [DATA_TGZ] [AUTOTUNE_TGZ]
#
# WHEELS_DIR holds wheels for the machine's Python (see below), installed with --no-deps into /tmp/site (not the
# system environment) and put first on PYTHONPATH with this checkout's src/. DATA_TGZ, if given, is a tar.gz of a
# folder named `data` laid out like shared/data; it is unpacked to /tmp/data and named by HYBRIDLORA_DATA and
# HYBRIDLORA_TEST_DATA. AUTOTUNE_TGZ, if given, holds Triton autotune results saved by `save_autotune` on an earlier
# machine with the same software: restoring them skips minutes of autotuning of fla's kernels
# (docs/PERFORMANCE.md, "A fresh machine").
#
# Wheels for a Python 3.12 image with torch and Triton already installed (as used for the figures in docs/;
# run on a machine with network, then copy the folder over):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d WHEELS_DIR \
#     fla-core==0.6.0 transformers==5.24.0 peft==0.21.2 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types typing-inspection 'typing-extensions>=4.16'
#   MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip wheel --no-build-isolation --no-deps \
#     mamba-ssm==2.3.2.post1 -w WHEELS_DIR        # the Triton ops only, no CUDA extension to build
# (fla-core needs einops; transformers needs huggingface-hub >= 1.31, tokenizers 0.23, safetensors >= 0.8:
# add wheels for whichever of these the image lacks.)

_wheels=${1:?usage: source bench/offline_gpu_env.sh WHEELS_DIR [DATA_TGZ] [AUTOTUNE_TGZ]}
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$_wheels"/*.whl && touch /tmp/site/.installed || return 1
fi
if [ -n "${2:-}" ] && [ ! -d /tmp/data ]; then
  tar xzf "$2" -C /tmp || return 1
fi
export PYTHONPATH=/tmp/site:$_root/src PYTHONUNBUFFERED=1
[ -d /tmp/data ] && export HYBRIDLORA_DATA=/tmp/data HYBRIDLORA_TEST_DATA=/tmp/data
# one kernel cache for every process of the session, autotune winners kept on disk
export TRITON_CACHE_DIR=$HOME/.triton/cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor TRITON_CACHE_AUTOTUNING=1
# fla's GDN backward with 128-dim key heads on Hopper (docs/PERFORMANCE.md, "Optional pieces")
export HYBRIDLORA_LIFT_FLA_HOPPER_GUARD=1
if [ -n "${3:-}" ] && [ -f "$3" ] && [ ! -f /tmp/.autotune_restored ]; then
  mkdir -p "$TRITON_CACHE_DIR" && tar xzf "$3" -C "$TRITON_CACHE_DIR" && touch /tmp/.autotune_restored
fi

save_autotune() {  # save_autotune FILE.tgz: Triton's autotune winners only (the compiled kernels are far larger)
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' | tar czf "$1" -T -) &&
    echo "autotune results saved: $(tar tzf "$1" | wc -l) files"
}

python3 -c "import torch, transformers, fla, triton; print('torch', torch.__version__, '| transformers', \
transformers.__version__, '| fla', fla.__version__, '| triton', triton.__version__, '|', \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
