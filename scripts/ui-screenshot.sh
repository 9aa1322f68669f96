#!/usr/bin/env bash
# A screenshot of the MLflow UI (`resnet-pipe ui`) showing a run's metric charts, taken by
# headless Chromium. Run it in a folder that holds mlflow.db (after `make run`, for example).
#
#   scripts/ui-screenshot.sh [RUN_NAME] [OUT.png]
#
# Needs chromium (Debian: apt-get install chromium). The UI binds to 127.0.0.1 only.
set -euo pipefail

run_name="${1:-quickstart}"
out="${2:-docs/images/mlflow-run-metrics.png}"
port="${PORT:-5055}"
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$here/.venv/bin/python}"

"$python" -m pipeline.cli ui --port "$port" > /tmp/resnet-pipe-ui.log 2>&1 &
ui=$!
trap 'kill $ui 2>/dev/null; pkill -f "mlflow.server.*--port $port" 2>/dev/null || true' EXIT
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    sleep 1
done

# the newest run of that name: its experiment and id, through MLflow's client
read -r experiment run_id < <("$python" - "$run_name" <<'EOF'
import sys
from mlflow.tracking import MlflowClient
from pipeline.tracking import tracking_uri
client = MlflowClient(tracking_uri())
ids = [e.experiment_id for e in client.search_experiments()]
run = client.search_runs(ids, f"attributes.run_name = '{sys.argv[1]}'", order_by=["attributes.start_time DESC"])[0]
print(run.info.experiment_id, run.info.run_id)
EOF
)

mkdir -p "$(dirname "$out")"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1100 \
    --virtual-time-budget=90000 --run-all-compositor-stages-before-draw --screenshot="$out" \
    "http://127.0.0.1:$port/#/experiments/$experiment/runs/$run_id/model-metrics" 2>/dev/null
echo "wrote $out (run $run_id)"
