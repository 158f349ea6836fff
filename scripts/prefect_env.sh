# shellcheck shell=bash
# prefect_env.sh - point Prefect (2.20 and 3.x) at a per-project home and sqlite database.
#
# SOURCE it, do not run it:   source scripts/prefect_env.sh [DIR]
# It only exports variables: it does not change the shell's options and never exits the shell.

_askap_prefect_env_help() {
    cat <<'EOF'
Usage: source scripts/prefect_env.sh [DIR]

Set up Prefect's environment for askap_flows in the current shell:
  PREFECT_HOME=DIR/prefectM        (M: the major of the Prefect that $PYTHON, else python3, imports)
  PREFECT_API_DATABASE_CONNECTION_URL=sqlite+aiosqlite:///DIR/prefectM/prefect.db     (Prefect 2.20)
  PREFECT_SERVER_DATABASE_CONNECTION_URL=sqlite+aiosqlite:///DIR/prefectM/prefect.db  (Prefect 3.x)
  PREFECT_SERVER_ANALYTICS_ENABLED=false   (no telemetry attempts from offline nodes)

DIR defaults to $ASKAP_FLOWS_HOME, else $PWD/.askap_flows. Prefect 2 and 3 get their own home
(DIR/prefect2, DIR/prefect3), as the main job keeps them; DIR/prefect without a Prefect to ask.
The home is created; DIR must be
writable. In a script, pass DIR explicitly: without it, bash hands the script's own first
argument to this file.

Legacy PREFECT_ORION_* variables (Prefect <= 2.9) are reported: Prefect 2.20 and 3.x ignore
them silently and fall back to sqlite.

sqlite suits a handful of concurrent sub-flows. For more, run PostgreSQL and a separate
'prefect server start':
  scripts/postgres_database.sh start --interface IF
  eval "$(scripts/postgres_database.sh url --interface IF)"    # after sourcing this file
EOF
}

_askap_prefect_env() {
    local dir home db url old name major
    if [ "$#" -gt 1 ]; then
        printf 'prefect_env.sh: error: expected at most one argument (DIR), got %s.\n' "$#" >&2
        printf "Usage: source scripts/prefect_env.sh [DIR]   (see: bash scripts/prefect_env.sh --help)\n" >&2
        return 1
    fi
    case "${1:-}" in
        -h | --help) _askap_prefect_env_help; return 0 ;;
        -*) printf "prefect_env.sh: error: unknown option '%s'. Usage: source scripts/prefect_env.sh [DIR]\n" "$1" >&2
            return 1 ;;
    esac
    dir="${1:-${ASKAP_FLOWS_HOME:-$PWD/.askap_flows}}"
    case "$dir" in
        /*) ;;
        *) dir="$PWD/$dir" ;;
    esac
    # one home per Prefect major, as the main job keeps them (the two cannot share a database)
    major=$("${PYTHON:-python3}" -c 'import importlib.metadata as m; print(m.version("prefect").split(".")[0])' 2>/dev/null) || major=""
    home="$dir/prefect$major"
    case "$home" in
        *'?'*)
            printf "prefect_env.sh: error: '%s' contains '?', which breaks the sqlite URL. Choose another DIR.\n" "$home" >&2
            return 1 ;;
    esac

    if ! mkdir -p -- "$home" 2>/dev/null; then
        printf 'prefect_env.sh: error: cannot create %s (permission denied or read-only file system).\n' "$home" >&2
        printf '  Fix: choose a writable directory: source scripts/prefect_env.sh DIR, or set ASKAP_FLOWS_HOME.\n' >&2
        printf '  Nothing was set.\n' >&2
        return 1
    fi
    if [ ! -w "$home" ] || { [ -e "$home/prefect.db" ] && [ ! -w "$home/prefect.db" ]; }; then
        printf 'prefect_env.sh: error: %s is not writable by %s; Prefect keeps its database and settings there.\n' \
            "$home" "$(id -un 2>/dev/null || echo you)" >&2
        printf '  Fix: choose a writable directory: source scripts/prefect_env.sh DIR, or set ASKAP_FLOWS_HOME.\n' >&2
        printf '  Nothing was set.\n' >&2
        return 1
    fi
    home="$(cd -- "$home" 2>/dev/null && pwd)" || return 1
    db="$home/prefect.db"
    url="sqlite+aiosqlite:///$db"

    # Legacy names: silently ignored by Prefect 2.20 and 3.x.
    for name in ${!PREFECT_ORION_@}; do
        printf '\n' >&2
        printf '!!! WARNING (prefect_env.sh): %s is set, but Prefect 2.20 and 3.x IGNORE PREFECT_ORION_* silently.\n' "$name" >&2
        case "$name" in
            PREFECT_ORION_DATABASE_CONNECTION_URL)
                printf '!!!   Your database setting is NOT used. Use PREFECT_API_DATABASE_CONNECTION_URL (2.20)\n' >&2
                # shellcheck disable=SC2016  # the text shows a command to type
                printf '!!!   and PREFECT_SERVER_DATABASE_CONNECTION_URL (3.x), e.g. eval "$(scripts/postgres_database.sh url)".\n' >&2 ;;
            PREFECT_ORION_DATABASE_*)
                printf '!!!   Renamed: PREFECT_API_DATABASE_%s (2.20), PREFECT_SERVER_DATABASE_%s (3.x).\n' \
                    "${name#PREFECT_ORION_DATABASE_}" "${name#PREFECT_ORION_DATABASE_}" >&2 ;;
            *)
                printf '!!!   Find the current name with: prefect config view --show-defaults\n' >&2 ;;
        esac
        printf "!!!   Then: unset %s\n" "$name" >&2
    done

    for name in PREFECT_API_DATABASE_CONNECTION_URL PREFECT_SERVER_DATABASE_CONNECTION_URL; do
        old="${!name:-}"
        if [ -n "$old" ] && [ "$old" != "$url" ]; then
            # Do not print passwords: user:PASS@ -> user:***@
            old="$(printf '%s' "$old" | sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#')"
            printf 'prefect_env.sh: note: replacing %s=%s\n' "$name" "$old" >&2
        fi
    done

    export PREFECT_HOME="$home"
    export PREFECT_API_DATABASE_CONNECTION_URL="$url"
    export PREFECT_SERVER_DATABASE_CONNECTION_URL="$url"
    export PREFECT_SERVER_ANALYTICS_ENABLED=false

    printf 'prefect_env.sh: set for Prefect 2.20 and 3.x:\n' >&2
    printf '  PREFECT_HOME=%s\n' "$PREFECT_HOME" >&2
    printf '  PREFECT_API_DATABASE_CONNECTION_URL=%s     (2.20)\n' "$url" >&2
    printf '  PREFECT_SERVER_DATABASE_CONNECTION_URL=%s  (3.x)\n' "$url" >&2
    printf '  PREFECT_SERVER_ANALYTICS_ENABLED=false\n' >&2
    return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    # Executed, not sourced: the variables would vanish with this process.
    case "${1:-}" in
        -h | --help) _askap_prefect_env_help; exit 0 ;;
    esac
    printf 'prefect_env.sh: error: this file must be sourced, not run: source %s [DIR]\n' "$0" >&2
    exit 2
fi

if _askap_prefect_env "$@"; then
    unset -f _askap_prefect_env _askap_prefect_env_help
    return 0
fi
unset -f _askap_prefect_env _askap_prefect_env_help
return 1
