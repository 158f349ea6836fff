#!/usr/bin/env bash
# scripts/pin_packages.sh [3|2 ...] -- regenerate the pinned package sets the tests install.
#   package_list.txt           Prefect 3 (the default install)
#   package_list_prefect2.txt  Prefect 2.20 (pip install -c package_list_prefect2.txt askap-flows)
# Each is `pip freeze` of a fresh venv with the project and its test extra (Prefect 3: and its
# server extra, prefect-redis), the project excluded.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
for major in "${@:-3}"; do
  case "$major" in
    3) out=$ROOT/package_list.txt; extras="test,server"; extra=("prefect>=3,<4") ;;
    2) out=$ROOT/package_list_prefect2.txt; extras="test"; extra=("prefect>=2.20,<3" "prefect-dask<0.3") ;;
    *) echo "usage: $0 [3|2 ...]" >&2; exit 2 ;;
  esac
  tmp=$(mktemp -d)
  "$PYTHON" -m venv "$tmp/venv"
  "$tmp/venv/bin/pip" install -q --disable-pip-version-check -e "${ROOT}[$extras]" "${extra[@]}"
  {
    echo "# Pinned Prefect $major set for askap_flows tests; regenerate: scripts/pin_packages.sh $major"
    "$tmp/venv/bin/pip" freeze --exclude-editable --disable-pip-version-check | grep -vi '^askap-flows'
  } > "$out"
  rm -rf "$tmp"
  echo "wrote $out ($(grep -vc '^#' "$out") packages)"
done
