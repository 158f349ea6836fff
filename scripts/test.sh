#!/usr/bin/env bash
# scripts/test.sh -- the whole test suite, from a fresh Debian 12 machine with Python 3.11.
#
#   ./scripts/test.sh                 both Prefect majors (3, then 2), every tier
#   ./scripts/test.sh -k spec         extra arguments go to pytest
#   ASKAP_TEST_PREFECT="3" ./scripts/test.sh     one major only
#
# It installs what the tests need (Debian: slurm-wlm, munge, mpich, Open MPI with PMIx,
# postgresql, the shellcheck linter, ...; a venv per Prefect major under .venvs/ with the pinned
# package sets), starts the 3-node SLURM test bed (scripts/slurm_testbed.sh), runs pytest in each
# venv and stops the test bed again (set ASKAP_TEST_KEEP_TESTBED=1 to leave it up).
# With CI=true a missing service fails its tests.
# Exit status: 0 only when every major passed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MAJORS=${ASKAP_TEST_PREFECT:-"3 2"}
VENVS=${ASKAP_TEST_VENVS:-$ROOT/.venvs}
PYTHON=${PYTHON:-python3}
OUT=$ROOT/test-output
mkdir -p "$OUT"

log() { printf '[test.sh %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "ERROR: $*"; exit 2; }

# ---------------------------------------------------------------- 1. system packages
# Open MPI + PMIx next to MPICH; slurm_testbed.sh up (step 3) points Debian's `mpicc`
# alternative at MPICH; mpi4py (step 2) is built with `mpicc.mpich` whatever it points at
PKGS=(slurm-wlm munge mpich libmpich-dev openmpi-bin libopenmpi-dev libpmix-dev postgresql
      redis-server shellcheck gcc libc6-dev iproute2 chromium)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})"
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---------------------------------------------------------------- 2. one venv per Prefect major
constraints_for() { if [ "$1" = 2 ]; then echo "$ROOT/package_list_prefect2.txt"; else echo "$ROOT/package_list.txt"; fi; }

setup_venv() {  # setup_venv MAJOR -> venv with the pinned set and the project (editable)
  local major=$1 venv=$VENVS/prefect$1 cons
  cons=$(constraints_for "$major")
  [ -f "$cons" ] || die "$cons is missing (regenerate with scripts/pin_packages.sh $major)"
  if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    "$PYTHON" -m venv "$venv"
  fi
  # mpi4py from source against the test bed's MPI, Debian's MPICH (`mpicc.mpich`: plain `mpicc`
  # is Open MPI's wherever Debian's alternatives prefer it); the PyPI wheel looks for
  # libmpi.so.12, which Debian's MPICH does not ship under that name. (-O0: the generated C is
  # large and only the test bed uses it; a build takes minutes at -O2)
  local pip=(env MPICC=mpicc.mpich CFLAGS="${CFLAGS:--O0}" "$venv/bin/pip" install -q
             --disable-pip-version-check --no-binary mpi4py -c "$cons")
  local stamp="$venv/.askap-installed"
  local want; want=$(cat "$cons" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing the pinned Prefect $major set into $venv"
    local extras="test"; if [ "$major" != 2 ]; then extras="test,server"; fi  # prefect-redis: 3 only
    "${pip[@]}" -e "${ROOT}[$extras]" > "$OUT/pip-prefect$major.log" 2>&1 \
      || { tail -20 "$OUT/pip-prefect$major.log"; die "pip install failed (log: $OUT/pip-prefect$major.log)"; }
    echo "$want" > "$stamp"
  fi
  # pip's cache may hold an mpi4py wheel built against Open MPI (by an earlier build with plain
  # mpicc): then it is dropped from the cache and built again
  if ! "$venv/bin/python" -c 'import sys; from mpi4py import MPI
sys.exit("MPICH" not in MPI.Get_library_version())' >/dev/null 2>&1; then
    log "rebuilding mpi4py in $venv against MPICH (mpicc.mpich)"
    "$venv/bin/pip" cache remove mpi4py >/dev/null 2>&1 || true
    "${pip[@]}" --force-reinstall --no-deps mpi4py > "$OUT/pip-mpi4py-prefect$major.log" 2>&1 \
      || die "mpi4py did not build against MPICH (log: $OUT/pip-mpi4py-prefect$major.log)"
  fi
}

# the build backend's wheels, so that tests/test_wheel.py builds the package offline and fast
WHEELHOUSE=$VENVS/wheelhouse
if ! compgen -G "$WHEELHOUSE/hatchling-*.whl" >/dev/null; then
  log "downloading the build backend (hatchling) into $WHEELHOUSE"
  "$PYTHON" -m pip download -q --disable-pip-version-check --only-binary :all: -d "$WHEELHOUSE" \
    hatchling > "$OUT/pip-wheelhouse.log" 2>&1 || die "pip download hatchling failed (log: $OUT/pip-wheelhouse.log)"
fi
export ASKAP_TEST_WHEELHOUSE=$WHEELHOUSE

# the venvs are built side by side (each mostly waits on downloads and one C compile)
pids=()
for major in $MAJORS; do setup_venv "$major" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || die "a venv could not be set up (see the lines above)"; done

# the test bed is shared by everything on this machine that submits jobs or stops nodes: hold its
# lock for the whole run (others take it with `flock /tmp/askap_testbed.lock CMD`)
exec 9>"${ASKAP_TESTBED_LOCK:-/tmp/askap_testbed.lock}"
if ! flock -n 9; then
  log "waiting for the test bed lock (${ASKAP_TESTBED_LOCK:-/tmp/askap_testbed.lock}) ..."
  flock 9
fi

# ---------------------------------------------------------------- 3. the SLURM test bed, under its lock
if [ "$(id -u)" = 0 ]; then
  bash "$ROOT/scripts/slurm_testbed.sh" up
  # shellcheck disable=SC1091
  source "${ASKAP_TESTBED_DIR:-/tmp/askap_testbed}/env.sh"
  if [ "${ASKAP_TEST_KEEP_TESTBED:-0}" != 1 ]; then
    trap 'bash "$ROOT/scripts/slurm_testbed.sh" down >/dev/null 2>&1 || true' EXIT
  fi
else
  log "not root: the SLURM test bed cannot be started; slurm tests will skip (fail with CI=true)"
fi

rc=0
summary=()
for major in $MAJORS; do
  log "pytest under Prefect $major"
  set +e
  # tests marked `once` (shell scripts, packaging, the second cluster, ...) run under the first major
  ASKAP_TEST_ONCE_DONE=$([ "$major" = "${MAJORS%% *}" ] && echo 0 || echo 1) \
  ASKAP_TEST_OUTPUT="$OUT/prefect$major" "$VENVS/prefect$major/bin/python" -m pytest \
    -p no:cacheprovider --junitxml="$OUT/junit-prefect$major.xml" "$@"
  r=$?
  set -e
  # pytest's 5 means "no test collected": with a -k filter that matched nothing under this major
  [ "$r" = 5 ] && [ $# -gt 0 ] && r=0
  summary+=("Prefect $major: $([ "$r" = 0 ] && echo passed || echo "FAILED (pytest exit $r)")")
  [ "$r" = 0 ] || rc=1
done
for s in "${summary[@]}"; do log "$s"; done
exit "$rc"
