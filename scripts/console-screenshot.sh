#!/usr/bin/env bash
# Regenerates docs/images/console-replication.png: runs the web console's browser test
# (compat/test_console.py: two clusters replicating, traffic from the official client) and
# saves its view of the clusters and replication links. Needs chromium (scripts/test.sh
# installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p docs/images
MERIDIAN_CONSOLE_SCREENSHOT="$PWD/docs/images/console-replication.png" \
  ./compat/run.sh -q -k test_console_pages_show_what_the_rest_api_reports "$@"
echo "== wrote docs/images/console-replication.png"
