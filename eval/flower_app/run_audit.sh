#!/usr/bin/env bash
# Run the example Flower app with Flower's own tooling (`flwr run` on a local simulation
# SuperLink), then audit what its curious server captured with `drivepriv audit`.
#   bash eval/flower_app/run_audit.sh [OUT_DIR] [drivepriv audit options, e.g. --attacks rgia-k]
# Needs drivepriv installed with the flower extra (README). Offline: nothing is downloaded.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$PWD/reports/flower_app}
shift || true
mkdir -p "$out"
out=$(cd "$out" && pwd)
rm -rf "$out/capture" "$out/truth"
# No telemetry, update check or run-time installation of the app's dependencies (uv would
# download them): Flower and Ray must touch no network.
export FLWR_HOME=${FLWR_HOME:-$out/flwr_home} RAY_USAGE_STATS_ENABLED=0 RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 \
  FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
cd "$here"
status=0
flwr run . --stream --federation-config "num-supernodes=4 client-resources-num-cpus=1" --run-config "out-dir='$out'" || status=$?
# `flwr run` starts a local SuperLink and leaves it running: stop it.
pkill -f "flower-superlink.*--database $FLWR_HOME/" || true
if [ "$status" -ne 0 ] || [ ! -f "$out/capture/capture.pt" ]; then
  echo "run_audit: the Flower run failed (exit $status, no $out/capture/capture.pt); see the log above" >&2
  exit 1
fi
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" drivepriv audit "$out/capture" --scenario merge --truth "$out/truth" \
  --model merge_app.task:Net --out "$out" "$@"
