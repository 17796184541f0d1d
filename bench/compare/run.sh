#!/bin/sh
# One command for the side-by-side comparison (see bench/README.md, "Comparison runner"). Needs root.
exec python3 "$(dirname "$0")/run.py" "$@"
