#!/usr/bin/env bash
# raygpt's Ray path on one GPU, in one command, on a machine without Ray or a network.
#
#   benchmarks/gpu_ray_check.sh [--bundle DIR] [ray_check.py's arguments: --device cuda|cpu, --json, --work]
#   benchmarks/gpu_ray_check.sh --device cpu --num-cpus 2      # the same path on a CPU (the tiny preset)
#
# Where Python cannot import Ray, the folder benchmarks/gpu_bundle.sh made (--bundle, default
# .raybundle/ in the repository) is installed into a temporary site folder first: the stripped
# Ray unpacked, and each wheel whose distribution is not installed already (the machine's own
# numpy, torch, protobuf... stay). --bundle installs it even where Ray is importable (to try
# the folder). Then benchmarks/ray_check.py: `raygpt train` on one GPU through Ray Train
# (gpt2-small, compiled, a checkpoint every 20 steps), SIGKILL of the driver after the first
# checkpoint, the same command again (it resumes), `raygpt eval` of the run, and the bare step
# at the same shape; one table (tokens/s under Ray against the bare step, the first and later
# checkpoint stalls, where the time to the first step went, validation and samples with their
# seconds) and the figures as JSON (--json, default ray_check.json).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
bundle=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) bundle=$2; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) args+=("$1"); shift ;;
    esac
done

if [ -n "$bundle" ] || ! python3 -c "import ray" 2>/dev/null; then
    bundle=${bundle:-$repo/.raybundle}
    [ -d "$bundle" ] || { echo "gpu_ray_check.sh: Python cannot import ray, and there is no $bundle: make it with" \
        "benchmarks/gpu_bundle.sh where pip reaches PyPI, and carry it here" >&2; exit 2; }
    site=$(mktemp -d)/site
    started=$(date +%s)
    python3 - "$bundle" "$site" <<'EOF'
import re, subprocess, sys, tarfile
from importlib import metadata
from pathlib import Path

bundle, site = Path(sys.argv[1]), Path(sys.argv[2])
site.mkdir(parents=True)
for archive in bundle.glob("ray-*-stripped.tar.*"):
    with tarfile.open(archive) as tar:
        tar.extractall(site, filter="tar")


def installed(wheel: Path) -> bool:
    try:
        metadata.version(re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]))
        return True
    except metadata.PackageNotFoundError:
        return False


wheels = sorted(bundle.glob("*.whl"))
missing = [w for w in wheels if not installed(w)]
print(f"gpu_ray_check.sh: Ray unpacked; {len(missing)} of the bundle's {len(wheels)} wheels installed (the machine has "
      f"the others): {' '.join(w.name.split('-')[0] for w in missing)}")
if missing:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *map(str, missing)],
                   check=True)
EOF
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    python3 -c "import ray, ray.train, ray.dashboard; print(f'gpu_ray_check.sh: ray {ray.__version__} from {ray.__file__}')"
    echo "gpu_ray_check.sh: installed in $(( $(date +%s) - started )) s"
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec python3 "$repo/benchmarks/ray_check.py" "${args[@]}"
