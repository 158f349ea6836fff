#!/usr/bin/env bash
# postgres_database.sh - run a private PostgreSQL server for Prefect (askap_flows).
#
# Start/stop/inspect one PostgreSQL server whose files all live under one directory,
# and print the Prefect database URL for it. See --help.
set -euo pipefail
umask 022

PROG=${0##*/}
SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)

usage() {
    cat <<EOF
Usage: $PROG start|stop|status|url [options]

Run a private PostgreSQL server for the Prefect server of askap_flows. All of its files
live under one directory; nothing else on the machine is touched (not the distribution's
default cluster, not any other data directory).

Commands:
  start    create (first time) and start the server, create role and database if missing,
           then print the export lines of 'url' on stdout. Idempotent: a running server
           is left running.
  stop     stop the server whose data directory is DIR/data (pg_ctl stop -m fast).
           The data stays; a later 'start' reuses it.
  status   exit 0 only when the server of DIR is running and accepts connections on
           ADDRESS:PORT; exit 3 otherwise.
  url      print, for eval, the Prefect database URL under both setting names:
             export PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...    (Prefect 2.20)
             export PREFECT_SERVER_DATABASE_CONNECTION_URL=postgresql+asyncpg://... (Prefect 3.x)
           Use:  eval "\$($0 url)"

Options (command-line option > environment variable > value recorded by the last start > default):
  --dir DIR            all server files      \$ASKAP_PG_DIR       default: \$PWD/.askap_flows/postgres
  --port N             TCP port              \$ASKAP_PG_PORT      default: 5432
  --address A          IP address to listen on and to put in the URL   \$ASKAP_PG_ADDRESS
  --interface IF       listen on the first IPv4 address of IF (ip -4 -o addr show dev IF)
                                             \$ASKAP_PG_INTERFACE
                       default address: the first address of 'hostname -I' (the node's
                       routable address, so that jobs on other nodes can reach it)
  --db NAME            database name         \$ASKAP_PG_DB        default: prefect
  --user NAME          database role         \$ASKAP_PG_USER      default: prefect
  --allow CIDR         also accept password logins from CIDR (repeatable; e.g. the cluster's
                       network 10.0.0.0/16)  \$ASKAP_PG_ALLOW (space separated).
                       Always accepted: the listen address and localhost.
  --max-connections N  max_connections       \$ASKAP_PG_MAX_CONNECTIONS default: 300
  --image IMAGE        run PostgreSQL from a container image (a .sif file or docker://postgres:16)
                       with apptainer/singularity   \$ASKAP_PG_IMAGE
  -h, --help           this text

Other environment variables:
  ASKAP_PG_PASSWORD    password of the role. Default: generated once, stored in DIR/password (0600).
  ASKAP_PG_BINDIR      directory holding initdb, pg_ctl and postgres. Default: the directory of
                       pg_ctl on PATH, else the newest /usr/lib/postgresql/*/bin (the version
                       matching an existing data directory is preferred).

Layout of DIR: data/ (PGDATA), run/ (unix socket), postgres.log, password, server.env.

As root, the server runs as the 'postgres' system user (PostgreSQL refuses to run as root):
DIR and its parents must be traversable by that user. As a normal user it runs as you.

Examples:
  $0 start --interface ib0          # on the node that runs the Prefect server
  eval "\$($0 url --interface ib0)"
  $0 status && $0 stop
EOF
}

# --------------------------------------------------------------------------- messages
say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
warn() { printf '%s: WARNING: %s\n' "$PROG" "$*" >&2; }
# die LINE...: print an error (first line prefixed) and exit 1. Nothing is undone or removed.
die() {
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    shift
    local line
    for line in "$@"; do printf '  %s\n' "$line" >&2; done
    exit 1
}
die_usage() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    printf "Run '%s --help' for usage.\n" "$PROG" >&2
    exit 2
}

# --------------------------------------------------------------------------- arguments
cmd=""
opt_dir="" opt_port="" opt_address="" opt_interface="" opt_db="" opt_user=""
opt_max_conn="" opt_image=""
opt_allow=()

need_value() { [[ $# -ge 2 && -n $2 ]] || die_usage "option $1 needs a value"; }

while (($#)); do
    case $1 in
        start | stop | status | url)
            [[ -z $cmd ]] || die_usage "give one command, got '$cmd' and '$1'"
            cmd=$1
            ;;
        -h | --help | help) usage; exit 0 ;;
        --dir | --port | --address | --interface | --db | --user | --allow | --max-connections | --image)
            need_value "$@"
            case $1 in
                --dir) opt_dir=$2 ;;
                --port) opt_port=$2 ;;
                --address) opt_address=$2 ;;
                --interface) opt_interface=$2 ;;
                --db) opt_db=$2 ;;
                --user) opt_user=$2 ;;
                --allow) opt_allow+=("$2") ;;
                --max-connections) opt_max_conn=$2 ;;
                --image) opt_image=$2 ;;
            esac
            shift
            ;;
        --*=*)
            # --opt=value: split and re-parse
            set -- "${1%%=*}" "${1#*=}" "${@:2}"
            continue
            ;;
        *) die_usage "unknown argument '$1'" ;;
    esac
    shift
done
[[ -n $cmd ]] || die_usage "missing command: start, stop, status or url"

# --------------------------------------------------------------------------- directory and state
dir=${opt_dir:-${ASKAP_PG_DIR:-$PWD/.askap_flows/postgres}}
dir=$(realpath -m -- "$dir")
data="$dir/data"
sockdir="$dir/run"
logfile="$dir/postgres.log"
pwfile="$dir/password"
statefile="$dir/server.env"

case "$dir/" in
    /var/lib/postgresql/* | /etc/postgresql/*)
        die "refusing to use $dir: it belongs to the distribution's PostgreSQL clusters." \
            "Fix: choose another --dir (default: \$PWD/.askap_flows/postgres)."
        ;;
esac

# Values recorded by the last 'start' (KEY=VALUE lines; parsed, never sourced).
declare -A state=()
if [[ -f $statefile ]]; then
    while IFS= read -r line || [[ -n $line ]]; do
        [[ $line =~ ^([A-Z_]+)=(.*)$ ]] || continue
        state[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
    done <"$statefile"
fi

port=${opt_port:-${ASKAP_PG_PORT:-${state[PORT]:-5432}}}
db=${opt_db:-${ASKAP_PG_DB:-${state[DB]:-prefect}}}
user=${opt_user:-${ASKAP_PG_USER:-${state[USER]:-prefect}}}
max_conn=${opt_max_conn:-${ASKAP_PG_MAX_CONNECTIONS:-300}}
image=${opt_image:-${ASKAP_PG_IMAGE:-${state[IMAGE]:-}}}
allow=("${opt_allow[@]}")
if [[ ${#allow[@]} -eq 0 && -n ${ASKAP_PG_ALLOW:-} ]]; then
    read -r -a allow <<<"$ASKAP_PG_ALLOW"
fi

if ! [[ $port =~ ^[0-9]{1,5}$ ]] || ((10#$port < 1 || 10#$port > 65535)); then
    die "invalid port '$port': give a number between 1 and 65535 (--port or ASKAP_PG_PORT)."
fi
port=$((10#$port))
if ! [[ $max_conn =~ ^[0-9]{2,6}$ ]] || ((10#$max_conn < 10)); then
    die "invalid max_connections '$max_conn': give a number >= 10 (--max-connections or ASKAP_PG_MAX_CONNECTIONS)."
fi
for name in "$db" "$user"; do
    [[ $name =~ ^[a-z_][a-z0-9_]{0,62}$ ]] ||
        die "invalid database or role name '$name': use lower-case letters, digits and '_' (e.g. prefect)."
done
is_ipv4() { [[ $1 =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] &&
    ((10#${BASH_REMATCH[1]} < 256 && 10#${BASH_REMATCH[2]} < 256 && 10#${BASH_REMATCH[3]} < 256 && 10#${BASH_REMATCH[4]} < 256)); }
is_ipv6() { [[ $1 =~ ^[0-9A-Fa-f:.]+$ && $1 == *:* ]]; }
for cidr in "${allow[@]}"; do
    [[ $cidr =~ ^[0-9A-Fa-f:.]+/[0-9]{1,3}$ ]] ||
        die "invalid --allow '$cidr': give an address range like 10.0.0.0/16."
done

# --------------------------------------------------------------------------- listen address
address_source=""
address_of_interface() {
    local ifname=$1 a
    command -v ip >/dev/null || die "cannot read the address of interface '$ifname': the 'ip' command is missing." \
        "Fix: give the address itself with --address or ASKAP_PG_ADDRESS."
    if ! a=$(ip -4 -o addr show dev "$ifname" 2>&1); then
        die "no network interface '$ifname' on $(hostname): $a" \
            "Fix: choose one of: $(ip -o link show | awk -F': ' '{print $2}' | tr '\n' ' ')(--interface), or --address."
    fi
    a=$(awk '{print $4}' <<<"$a" | head -n 1)
    [[ -n $a ]] || die "interface '$ifname' has no IPv4 address." "Fix: use another --interface, or --address."
    printf '%s\n' "${a%%/*}"
}
if [[ -n $opt_address ]]; then
    address=$opt_address address_source="--address"
elif [[ -n $opt_interface ]]; then
    address=$(address_of_interface "$opt_interface") address_source="--interface $opt_interface"
elif [[ -n ${ASKAP_PG_ADDRESS:-} ]]; then
    address=$ASKAP_PG_ADDRESS address_source="ASKAP_PG_ADDRESS"
elif [[ -n ${ASKAP_PG_INTERFACE:-} ]]; then
    address=$(address_of_interface "$ASKAP_PG_INTERFACE") address_source="ASKAP_PG_INTERFACE=$ASKAP_PG_INTERFACE"
elif [[ -n ${state[ADDRESS]:-} ]]; then
    address=${state[ADDRESS]} address_source="recorded by the last start in $statefile"
else
    address=$(hostname -I 2>/dev/null | awk '{print $1}') || address=""
    address_source="first address of 'hostname -I'"
    [[ -n $address ]] || die "cannot find this node's network address ('hostname -I' printed nothing)." \
        "Fix: give --address A or --interface IF (or ASKAP_PG_ADDRESS / ASKAP_PG_INTERFACE)."
fi
if is_ipv4 "$address"; then
    host_cidr="$address/32" url_host=$address
elif is_ipv6 "$address"; then
    host_cidr="$address/128" url_host="[$address]"
else
    die "invalid listen address '$address' (from $address_source): give an IPv4 or IPv6 address."
fi
case $address in
    0.0.0.0 | :: | '*') die "listen address '$address' means 'every interface' and cannot be used in a URL." \
        "Fix: give the one address clients should use (--address or --interface)." ;;
esac

# --------------------------------------------------------------------------- backend and binaries
as_root=false
[[ $EUID -eq 0 ]] && as_root=true
if $as_root; then
    command -v runuser >/dev/null || die "running as root but 'runuser' is missing (PostgreSQL refuses to run as root)." \
        "Fix: run this script as a normal user."
    id -u postgres >/dev/null 2>&1 || die "running as root, but there is no 'postgres' system user to run the server as (PostgreSQL refuses to run as root)." \
        "Fix: run this script as a normal user, or create the user: useradd --system --home /var/lib/postgresql postgres"
    server_user=postgres
else
    server_user=$(id -un)
fi

# Run a command as the user that owns the server (postgres when we are root).
as_server() {
    if $as_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

backend=native
container=""
if [[ -n $image ]]; then
    for c in apptainer singularity; do
        if command -v "$c" >/dev/null; then container=$c && break; fi
    done
    if [[ -n $container ]]; then
        backend=container
        [[ $image == *://* ]] || image=$(realpath -m -- "$image")
        [[ $image == *://* || -r $image ]] || die "container image '$image' not found or not readable." \
            "Fix: give a .sif file (apptainer pull postgres.sif docker://postgres:16) or a docker:// URI in ASKAP_PG_IMAGE / --image."
    else
        warn "ASKAP_PG_IMAGE/--image is set but neither apptainer nor singularity is on PATH; using PostgreSQL binaries from this machine instead."
        image=""
    fi
fi
instance="askap-pg-$(printf '%s' "$dir" | cksum | cut -d' ' -f1)"

major_of_datadir=""
[[ -f $data/PG_VERSION ]] && major_of_datadir=$(tr -d '[:space:]' <"$data/PG_VERSION")

no_binaries() {
    die "no PostgreSQL server binaries found ($1)." \
        "Fix, one of:" \
        "  - install them: apt-get install postgresql   (Debian/Ubuntu; dnf install postgresql-server on RHEL)" \
        "  - on an HPC system: module avail postgres; module load <postgresql module>" \
        "  - point ASKAP_PG_BINDIR at a directory with initdb, pg_ctl and postgres" \
        "  - use a container: ASKAP_PG_IMAGE=docker://postgres:16 (or a .sif) with apptainer/singularity on PATH"
}
has_server_bins() { [[ -x $1/initdb && -x $1/pg_ctl && -x $1/postgres ]]; }

bindir=""
resolve_binaries() {
    [[ $backend == native && -z $bindir ]] || return 0
    if [[ -n ${ASKAP_PG_BINDIR:-} ]]; then
        bindir=$(realpath -m -- "$ASKAP_PG_BINDIR")
        has_server_bins "$bindir" || no_binaries "ASKAP_PG_BINDIR=$ASKAP_PG_BINDIR has no initdb, pg_ctl and postgres"
        return 0
    fi
    local p d candidates=()
    if [[ -n $major_of_datadir ]] && has_server_bins "/usr/lib/postgresql/$major_of_datadir/bin"; then
        bindir=/usr/lib/postgresql/$major_of_datadir/bin
    elif p=$(command -v pg_ctl) && has_server_bins "$(dirname -- "$(realpath -- "$p")")"; then
        bindir=$(dirname -- "$(realpath -- "$p")")
    else
        mapfile -t candidates < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V -r)
        for d in "${candidates[@]}"; do
            if has_server_bins "$d"; then bindir=$d && break; fi
        done
    fi
    [[ -n $bindir ]] || no_binaries "none on PATH, none in /usr/lib/postgresql/*/bin"
}

# pg PROG ARGS...: run a PostgreSQL program as the server user, natively or in the image.
pg() {
    local prog=$1
    shift
    if [[ $backend == native ]]; then
        local exe="$bindir/$prog"
        [[ -x $exe ]] || exe=$(command -v "$prog") ||
            die "PostgreSQL program '$prog' not found next to $bindir/pg_ctl nor on PATH."
        as_server "$exe" "$@"
    else
        as_server "$container" exec --cleanenv --bind "$dir" "$image" "$prog" "$@"
    fi
}
# pgi PROG ARGS...: same, but inside the running container instance (natively: same as pg).
pgi() {
    if [[ $backend == native ]]; then
        pg "$@"
    else
        as_server "$container" exec "instance://$instance" "$@"
    fi
}

bin_major() {
    local v
    v=$(pg postgres --version 2>&1) || die "cannot run 'postgres --version': $v"
    [[ $v =~ PostgreSQL\)\ ([0-9]+) ]] || die "cannot read the PostgreSQL version from: $v"
    printf '%s\n' "${BASH_REMATCH[1]}"
}

# cd somewhere every user can enter, so that commands run as postgres do not complain.
cd /

# --------------------------------------------------------------------------- helpers
server_running() {
    # 0 when a postmaster runs with DIR/data as its data directory.
    [[ -f $data/PG_VERSION && -f $data/postmaster.pid ]] || return 1
    if [[ $backend == container ]]; then
        container_instance_running || return 1
        pgi pg_ctl status -D "$data" >/dev/null 2>&1
    else
        pg pg_ctl status -D "$data" >/dev/null 2>&1
    fi
}

container_instance_running() {
    as_server "$container" instance list 2>/dev/null | awk -v n="$instance" '$1 == n {found=1} END {exit !found}'
}

accepting() { # accepting ADDRESS PORT
    local exe
    if [[ $backend == native && -x $bindir/pg_isready ]]; then
        exe=$bindir/pg_isready
    elif exe=$(command -v pg_isready); then
        :
    else
        # No client tools on the host: ask inside the container.
        pgi pg_isready -q -t 3 -h "$1" -p "$2" -d postgres
        return
    fi
    "$exe" -q -t 3 -h "$1" -p "$2" -d postgres
}

urlencode() {
    local LC_ALL=C s=$1 out="" c i
    for ((i = 0; i < ${#s}; i++)); do
        c=${s:i:1}
        case $c in
            [A-Za-z0-9._~-]) out+=$c ;;
            *) out+=$(printf '%%%02X' "'$c") ;;
        esac
    done
    printf '%s' "$out"
}

read_password() {
    # Sets $password and $password_from. Generates and stores one when $1 == create.
    if [[ -n ${ASKAP_PG_PASSWORD:-} ]]; then
        password=$ASKAP_PG_PASSWORD password_from=env
        return
    fi
    if [[ ${state[PASSWORD_FROM]:-} == env && ${1:-} != create ]]; then
        die "the server in $dir was started with ASKAP_PG_PASSWORD, which is not set now." \
            "Fix: export ASKAP_PG_PASSWORD again, or run '$PROG start' without it (the role then gets the password stored in $pwfile)."
    fi
    if [[ ! -f $pwfile ]]; then
        [[ ${1:-} == create ]] || die "no password yet for $dir ($pwfile is missing)." \
            "Fix: run '$PROG start' first, or set ASKAP_PG_PASSWORD."
        local p
        p=$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')
        (umask 077 && printf '%s\n' "$p" >"$pwfile.tmp.$$") && mv -f -- "$pwfile.tmp.$$" "$pwfile"
    fi
    chmod 600 -- "$pwfile" 2>/dev/null || true
    IFS= read -r password <"$pwfile" || true
    [[ -n $password ]] || die "$pwfile is empty." "Fix: delete it and run '$PROG start' (a new password is generated), or set ASKAP_PG_PASSWORD."
    password_from="file"
}

print_urls() {
    local url
    url="postgresql+asyncpg://$user:$(urlencode "$password")@$url_host:$port/$db"
    printf 'export PREFECT_API_DATABASE_CONNECTION_URL=%q\n' "$url"
    printf 'export PREFECT_SERVER_DATABASE_CONNECTION_URL=%q\n' "$url"
}

write_state() {
    {
        printf 'ADDRESS=%s\nPORT=%s\nDB=%s\nUSER=%s\nBACKEND=%s\nIMAGE=%s\nPASSWORD_FROM=%s\n' \
            "$address" "$port" "$db" "$user" "$backend" "$image" "$password_from"
    } >"$statefile.tmp.$$" && mv -f -- "$statefile.tmp.$$" "$statefile"
}

# Overwrite an existing file in place (keeps its owner, so the server can still read it).
# New files are given to the server user.
write_server_file() { # write_server_file PATH  (content on stdin)
    local f=$1 new=false
    [[ -e $f ]] || new=true
    cat >"$f"
    if $new; then
        chmod 600 -- "$f"
        if $as_root; then chown postgres: -- "$f"; fi
    fi
}

show_log_tail() {
    if [[ -r $logfile ]]; then
        printf '%s: last lines of %s:\n' "$PROG" "$logfile" >&2
        tail -n 15 -- "$logfile" | sed 's/^/    /' >&2
    fi
}

port_holders() { # prints the listeners that would collide with ADDRESS:PORT
    if command -v ss >/dev/null; then
        ss -Hltnp "( sport = :$port )" 2>/dev/null | awk -v a="$address" -v a6="[$address]" '{
            n = split($4, parts, ":"); host = substr($4, 1, length($4) - length(parts[n]) - 1)
            if (host == a || host == a6 || host == "0.0.0.0" || host == "*" || host == "[::]") print
        }'
    else
        # Without ss: a connect to our own listen address tells whether the port is taken.
        # shellcheck disable=SC2016  # $1/$2 expand in the inner bash
        if timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$address" "$port" 2>/dev/null; then
            echo "something accepts connections on $address:$port"
        fi
    fi
}

# Nearest existing ancestor of a path (the path itself when it exists).
existing_ancestor() {
    local p=$1
    while [[ ! -e $p ]]; do p=$(dirname -- "$p"); done
    printf '%s\n' "$p"
}

check_dir_usable() {
    local anc
    anc=$(existing_ancestor "$dir")
    if [[ ! -d $anc ]]; then
        die "cannot create $dir: $anc is not a directory." "Fix: choose another --dir."
    fi
    if [[ ! -w $anc ]]; then
        if [[ $anc == "$dir" ]]; then
            die "directory $dir is not writable by $(id -un)." \
                "Fix: choose a directory you own with --dir (or ASKAP_PG_DIR), e.g. \$HOME/.askap_flows/postgres or one on /scratch, or fix its permissions."
        fi
        die "cannot create $dir: $anc is not writable by $(id -un)." \
            "Fix: choose a directory you own with --dir (or ASKAP_PG_DIR), e.g. \$HOME/.askap_flows/postgres or one on /scratch."
    fi
    if $as_root && ! runuser -u postgres -- test -x "$anc"; then
        # Name the first component that stops user postgres.
        local p="" comp blocker=$anc
        IFS=/ read -r -a comps <<<"${anc#/}"
        for comp in "${comps[@]}"; do
            p+="/$comp"
            if ! runuser -u postgres -- test -x "$p"; then blocker=$p && break; fi
        done
        die "user postgres cannot reach $dir: $blocker ($(stat -c '%A %U:%G' -- "$blocker")) is not traversable by postgres." \
            "As root, the server runs as the postgres system user (PostgreSQL refuses root), and it must reach its data directory." \
            "Fix: chmod o+x $blocker, or use a --dir below a directory postgres can traverse (e.g. /var/tmp/askap_pg or /srv/askap_pg)."
    fi
}

check_datadir() {
    [[ -e $data ]] || return 0
    [[ -d $data ]] || die "$data exists and is not a directory; it was left untouched." "Fix: choose another --dir."
    local owner want
    owner=$(stat -c %U -- "$data")
    want=$server_user
    if [[ $owner != "$want" ]]; then
        die "$data is owned by '$owner', but the server runs as '$want'; it was left untouched." \
            "Fix: choose another --dir, or, if this data directory is yours: chown -R $want: $data"
    fi
    if [[ -z $major_of_datadir ]]; then
        if [[ -n $(ls -A -- "$data") ]]; then
            die "$data is not empty and is not a PostgreSQL data directory (no PG_VERSION); it was left untouched." \
                "Fix: choose another --dir, or empty that directory yourself."
        fi
        return 0
    fi
    local have
    have=$(bin_major)
    if [[ $major_of_datadir != "$have" ]]; then
        local where=${bindir:-$image}
        die "$data was created by PostgreSQL $major_of_datadir, but the server binaries found are PostgreSQL $have ($where). Nothing was changed." \
            "Fix, one of:" \
            "  - use PostgreSQL $major_of_datadir binaries: ASKAP_PG_BINDIR=/path/to/postgresql-$major_of_datadir/bin, 'module load' that version, or ASKAP_PG_IMAGE=docker://postgres:$major_of_datadir" \
            "  - upgrade the data with pg_upgrade (keep a copy first)" \
            "  - start a fresh server elsewhere: --dir NEW_DIR"
    fi
}

sql_literal() { local s=${1//\'/\'\'}; printf "'%s'" "$s"; }

ensure_role_and_db() {
    local super=$server_user
    local sql
    sql="\\set ON_ERROR_STOP on
SET client_min_messages = warning;
DO \$\$BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$user') THEN
    CREATE ROLE $user LOGIN;
  END IF;
END\$\$;
ALTER ROLE $user WITH LOGIN PASSWORD $(sql_literal "$password");
SELECT 'CREATE DATABASE $db OWNER $user' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$db')\\gexec
"
    local out
    # Through the unix socket in DIR/run, as the bootstrap superuser (peer authentication).
    # The SQL (with the password) goes through stdin, never through the command line.
    if ! out=$(pgi psql -X -q -h "$sockdir" -p "$port" -U "$super" -d postgres -f - <<<"$sql" 2>&1); then
        die "could not create role '$user' and database '$db': $out" "The server keeps running; see $logfile."
    fi
}

# --------------------------------------------------------------------------- commands
do_url() {
    read_password
    print_urls
}

do_status() {
    if ! server_running; then
        say "not running: no server with data directory $data."
        exit 3
    fi
    if ! accepting "$address" "$port"; then
        say "a server runs with data directory $data, but it does not accept connections on $address:$port."
        [[ -n ${state[ADDRESS]:-} ]] && say "the last start recorded $(printf '%s:%s' "${state[ADDRESS]}" "${state[PORT]:-?}") in $statefile."
        exit 3
    fi
    local pid
    pid=$(head -n 1 -- "$data/postmaster.pid" 2>/dev/null || echo '?')
    say "running: pid $pid, data $data, listening on $address:$port, database '$db', role '$user'."
    exit 0
}

do_stop() {
    if ! server_running; then
        say "not running: no server with data directory $data (nothing to stop)."
        if [[ $backend == container ]] && container_instance_running; then
            as_server "$container" instance stop "$instance" >/dev/null 2>&1 || true
        fi
        exit 0
    fi
    local out
    if ! out=$(pgi pg_ctl stop -D "$data" -m fast -w -t 60 2>&1); then
        show_log_tail
        die "pg_ctl stop failed for $data: $out"
    fi
    if [[ $backend == container ]]; then
        as_server "$container" instance stop "$instance" >/dev/null 2>&1 || true
    fi
    say "stopped the server of $data (data kept; '$PROG start' reuses it)."
}

do_start() {
    local sock="$sockdir/.s.PGSQL.$port"
    if ((${#sock} > 107)); then
        die "the path of the server's unix socket would be too long (${#sock} > 107 bytes): $sock" \
            "Fix: use a shorter --dir."
    fi

    if server_running; then
        local rec_addr=${state[ADDRESS]:-} rec_port=${state[PORT]:-}
        if [[ -n $rec_addr && ($rec_addr != "$address" || $rec_port != "$port") ]]; then
            die "the server of $data is already running on $rec_addr:$rec_port, not on $address:$port." \
                "Fix: '$PROG stop --dir $dir' first, or use address $rec_addr and port $rec_port."
        fi
        say "already running (data $data); making sure role '$user' and database '$db' exist."
        read_password create
        ensure_role_and_db
        write_state
        print_urls
        return 0
    fi

    check_dir_usable
    check_datadir

    local holders
    holders=$(port_holders)
    if [[ -n $holders ]]; then
        die "port $port on $address is already in use:" \
            "$holders" \
            "Fix: choose another port with --port (or ASKAP_PG_PORT), or stop the program that holds it."
    fi

    # Create what is missing; only what is created here is given to the server user.
    mkdir -p -- "$dir"
    [[ -w $dir ]] || die "directory $dir is not writable by $(id -un)." \
        "Fix: choose a directory you own with --dir (or ASKAP_PG_DIR)."
    local d
    for d in "$data" "$sockdir"; do
        if [[ ! -e $d ]]; then
            mkdir -m 700 -- "$d"
            if $as_root; then chown postgres: -- "$d"; fi
        fi
    done
    if [[ ! -e $logfile ]]; then
        : >"$logfile"
        chmod 640 -- "$logfile"
        if $as_root; then chown postgres: -- "$logfile"; fi
    fi
    read_password create

    if [[ ! -f $data/PG_VERSION ]]; then
        say "initialising a new PostgreSQL data directory in $data (as user $server_user)"
        local out
        if ! out=$(pg initdb -D "$data" -U "$server_user" --auth-local=peer --auth-host=scram-sha-256 \
            --encoding=UTF8 --locale=C 2>&1); then
            die "initdb failed: $out"
        fi
    fi

    # Our settings live in one file that is rewritten at every start.
    local conf_dir=$sockdir
    conf_dir=${conf_dir//\'/\'\'}
    write_server_file "$data/askap_flows.conf" <<EOF
# Written by $PROG at every start; edit the options of the script instead.
listen_addresses = '$address'
port = $port
unix_socket_directories = '$conf_dir'
max_connections = $max_conn
password_encryption = 'scram-sha-256'
EOF
    if ! grep -q "^include_if_exists = 'askap_flows.conf'" "$data/postgresql.conf"; then
        printf "\n# askap_flows: listen address, port, socket directory, max_connections\ninclude_if_exists = 'askap_flows.conf'\n" >>"$data/postgresql.conf"
    fi
    # pg_hba.conf: a managed block, rewritten in place (password logins from the listen
    # address, and from the --allow ranges); initdb's localhost lines stay.
    local hba="$data/pg_hba.conf" begin="# BEGIN askap_flows" end="# END askap_flows" content
    content=$(awk -v b="$begin" -v e="$end" '$0 == b {skip=1} !skip {print} $0 == e {skip=0}' "$hba")
    {
        printf '%s\n' "$content"
        printf '%s\n' "$begin"
        printf 'host    all    all    %s    scram-sha-256\n' "$host_cidr"
        local cidr
        for cidr in "${allow[@]}"; do printf 'host    all    all    %s    scram-sha-256\n' "$cidr"; done
        printf '%s\n' "$end"
    } | write_server_file "$hba"

    if [[ $backend == container ]] && ! container_instance_running; then
        local out
        if ! out=$(as_server "$container" instance start --cleanenv --bind "$dir" "$image" "$instance" 2>&1); then
            die "could not start the container instance $instance from $image: $out"
        fi
    fi
    say "starting PostgreSQL on $address:$port (address from $address_source), data $data, log $logfile"
    local out
    if ! out=$(pgi pg_ctl start -D "$data" -l "$logfile" -w -t 60 2>&1); then
        show_log_tail
        if tail -n 15 -- "$logfile" 2>/dev/null | grep -q 'Address already in use'; then
            die "the server did not start: port $port on $address is already taken (a socket bound there, not shown by 'ss -ltn' if it does not listen)." \
                "Fix: choose another port with --port (or ASKAP_PG_PORT). Nothing was removed."
        fi
        die "the server did not start: $out" "Nothing was removed; fix the cause above and run '$PROG start' again."
    fi
    local i
    for ((i = 0; i < 60; i++)); do
        accepting "$address" "$port" && break
        sleep 0.5
    done
    if ((i == 60)); then
        show_log_tail
        die "the server runs but does not accept connections on $address:$port after 30 s." \
            "It was left running; '$PROG stop --dir $dir' stops it."
    fi
    ensure_role_and_db
    write_state
    say "ready: database '$db', role '$user', $address:$port. For Prefect, run:"
    say "  eval \"\$($SCRIPT_DIR/$PROG url --dir $dir)\""
    print_urls
}

case $cmd in
    start) resolve_binaries && do_start ;;
    stop) resolve_binaries && do_stop ;;
    status) resolve_binaries && do_status ;;
    url) do_url ;;
esac
