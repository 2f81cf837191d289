#!/bin/sh
# Container entrypoint: serve the preset configs/$JAMBA_PRESET.yaml (relative to WORKDIR /app) with
# any extra jamba-server flags given as arguments. An empty JAMBA_PRESET means flags only.
# `exec` replaces this shell, so SIGTERM reaches jamba-server itself and it drains gracefully.
set -eu

if [ -z "${JAMBA_PRESET:-}" ]; then
    exec jamba-server "$@"
fi

config="configs/${JAMBA_PRESET}.yaml"
if [ ! -f "$config" ]; then
    available=""
    for path in configs/*.yaml; do
        [ -f "$path" ] && available="${available} $(basename "$path" .yaml)"
    done
    echo "jamba-server: unknown JAMBA_PRESET '${JAMBA_PRESET}' (no ${config});" \
        "available presets:${available:- none}" >&2
    exit 2
fi

exec jamba-server --config "$config" "$@"
