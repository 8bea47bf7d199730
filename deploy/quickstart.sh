#!/usr/bin/env bash
# Sets everything up and serves the hosted models in the foreground (the README's first command):
# generates the medium world into .marquee/data/medium (once), trains the five registry models on
# it into .marquee/registry (once: later runs find them there and train nothing), promotes each
# new version to production (its gates checked by the registry), prints example calls, and serves
# the registry with the world's features materialised into the in-process store: KServe v2 REST
# on 8000, gRPC on 8001, Prometheus metrics on 8002, /v1/predict for every model. Extra arguments
# go to `marquee serve`, e.g. `deploy/quickstart.sh --http-port 9000`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
deploy/setup.sh
cargo build --release -p marquee-cli --bin marquee
MARQUEE="${CARGO_TARGET_DIR:-target}/release/marquee"
DATA=.marquee/data/medium
REGISTRY=.marquee/registry
export MARQUEE_LOG=${MARQUEE_LOG:-warn}

if [ ! -f "$DATA/features.toml" ]; then
  "$MARQUEE" data generate --scale medium --seed 42 --out "$DATA"
fi
# A model whose gates fail is not pushed (and is tried again next time); the others serve.
"$MARQUEE" train all --data "$DATA" --registry "$REGISTRY" --work .marquee/work --seed 42 --missing-only ||
  echo "some models were not pushed (above); serving the others"

for model in embedding movie_search fraud pricing recommendation; do
  if ! "$MARQUEE" registry --registry "$REGISTRY" show "$model" production --json >/dev/null 2>&1; then
    version=$("$MARQUEE" registry --registry "$REGISTRY" list "$model" --json 2>/dev/null |
      .marquee/venv/bin/python -c 'import json, sys; print(max((v["version"] for v in json.load(sys.stdin)), default=""))' 2>/dev/null ||
      true)
    [ -n "$version" ] || continue
    "$MARQUEE" registry --registry "$REGISTRY" promote "$model" "$version" --to staging --by quickstart >/dev/null
    "$MARQUEE" registry --registry "$REGISTRY" promote "$model" "$version" --to production \
      --by quickstart --approved-by quickstart --reason "quick start: trained on $DATA, gates held" >/dev/null
    echo "$model version $version promoted to production"
  fi
done

cat <<'EXAMPLES'

Serving on localhost:8000 (REST), 8001 (gRPC), 8002 (metrics). Try:

  # recommendations for a user (their bookings from the feature store)
  curl -s localhost:8000/v1/predict -d '{"model": "recommendation", "entities": {"user_id": "u120"}}'
  # a price quote for a show
  curl -s localhost:8000/v1/predict -d '{"model": "pricing", "entities": {"show_id": "s120"},
    "features": {"base_price": 12.0, "current_price": 12.0, "hours_to_show": 30, "weekday": 5, "hour": 19.5}}'
  # a fraud decision for a booking
  curl -s localhost:8000/v1/predict -d '{"model": "fraud", "entities": {"user_id": "u120"},
    "features": {"distance_from_home_km": 850, "seats": 6, "amount": 90, "hour_of_day": 3, "new_device": true}}'
  # search
  curl -s localhost:8000/v1/predict -d '{"model": "movie_search", "features": {"query": "a heist in a casino"}}'
  # an embedding, OpenAI's way
  curl -s localhost:8000/v1/embeddings -d '{"model": "embedding", "input": "two tickets for tonight"}'

EXAMPLES
# Every prediction and deployment decision is logged as Parquet files by hour under
# .marquee/events (the embedded sink; --event-sink kafka --event-brokers HOST:PORT for Kafka).
exec "$MARQUEE" serve --registry "$REGISTRY" --features "$DATA/features.toml" --materialize \
  --event-sink parquet --events-dir "$ROOT/.marquee/events" "$@"
