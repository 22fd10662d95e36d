# shellcheck shell=bash
# Test/demo environment for kinesis-tower. Source it; don't execute it:
#
#   source scripts/env.sh
#   ensure_kinesis_mock
#
# Everything here talks to 127.0.0.1 only. The functions are idempotent: each
# checks first and only installs or starts what is missing.

KT_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KT_REPO

export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=test
export AWS_REGION=us-east-1
export AWS_DEFAULT_REGION=us-east-1
# Without this the SDK probes an EC2 metadata address off this machine.
export AWS_EC2_METADATA_DISABLED=true
export NO_PROXY=127.0.0.1,localhost
export no_proxy=127.0.0.1,localhost

KINESIS_MOCK_VERSION=0.6.2
KINESIS_MOCK_PORT=4570
KINESIS_MOCK_TLS_PORT=4571
export KINESIS_MOCK_ENDPOINT="http://127.0.0.1:${KINESIS_MOCK_PORT}"
export AWS_ENDPOINT_URL_KINESIS="${AWS_ENDPOINT_URL_KINESIS:-$KINESIS_MOCK_ENDPOINT}"

KT_EMULATOR_DIR="$KT_REPO/.emulators"
KT_EMULATOR_LOG_DIR="$KT_REPO/target/emulators"

kt_log() { echo "[env.sh] $*" >&2; }

# Run a command as root (directly, or via sudo when available).
kt_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        kt_log "need root for: $*"
        return 1
    fi
}

KT_APT_UPDATED=${KT_APT_UPDATED:-0}
kt_apt_install() {
    if [ "$KT_APT_UPDATED" != 1 ]; then
        kt_as_root env DEBIAN_FRONTEND=noninteractive apt-get update || return 1
        KT_APT_UPDATED=1
    fi
    kt_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

# True when something accepts TCP connections on 127.0.0.1:$1.
kt_port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") >/dev/null 2>&1
}

# True when an HTTP server answers (any status) on 127.0.0.1:$1.
kt_http_answers() {
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$1/"
    else
        kt_port_open "$1"
    fi
}

# kt_wait_for <description> <deadline seconds> <command...>
kt_wait_for() {
    local what=$1 deadline=$2
    shift 2
    local start=$SECONDS
    until "$@"; do
        if [ $((SECONDS - start)) -ge "$deadline" ]; then
            kt_log "$what: not ready after ${deadline}s"
            return 1
        fi
        sleep 0.2
    done
}

ensure_node() {
    if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
        return 0
    fi
    kt_log "installing nodejs and npm with apt"
    kt_apt_install nodejs npm || return 1
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1
}

# kinesis-mock (npm package kinesis-local), plain HTTP on 127.0.0.1:4570.
ensure_kinesis_mock() {
    local pkg_dir="$KT_EMULATOR_DIR/node_modules/kinesis-local"
    local log="$KT_EMULATOR_LOG_DIR/kinesis-mock.log"
    local pid_file="$KT_EMULATOR_LOG_DIR/kinesis-mock.pid"

    if kt_http_answers "$KINESIS_MOCK_PORT"; then
        return 0
    fi

    ensure_node || return 1

    local installed=""
    if [ -f "$pkg_dir/package.json" ]; then
        installed=$(node -p "require(process.argv[1]).version" "$pkg_dir/package.json" 2>/dev/null || true)
    fi
    if [ "$installed" != "$KINESIS_MOCK_VERSION" ]; then
        kt_log "installing kinesis-local@$KINESIS_MOCK_VERSION into $KT_EMULATOR_DIR"
        mkdir -p "$KT_EMULATOR_DIR" || return 1
        npm install --no-save --no-package-lock --no-audit --no-fund \
            --prefix "$KT_EMULATOR_DIR" "kinesis-local@$KINESIS_MOCK_VERSION" >&2 || return 1
    fi
    if [ ! -f "$pkg_dir/main.js" ] || [ ! -f "$pkg_dir/server.json" ]; then
        kt_log "kinesis-local install incomplete: $pkg_dir"
        return 1
    fi

    mkdir -p "$KT_EMULATOR_LOG_DIR" || return 1
    rm -f "$pid_file"
    kt_log "starting kinesis-mock on 127.0.0.1:$KINESIS_MOCK_PORT (log: $log)"
    local detach=()
    if command -v setsid >/dev/null 2>&1; then detach=(setsid); fi
    (
        cd "$KT_EMULATOR_DIR" || exit 1
        KINESIS_MOCK_PLAIN_PORT=$KINESIS_MOCK_PORT \
        KINESIS_MOCK_TLS_PORT=$KINESIS_MOCK_TLS_PORT \
        KINESIS_MOCK_CERT_PATH="$pkg_dir/server.json" \
        CREATE_STREAM_DURATION=0ms \
        DELETE_STREAM_DURATION=0ms \
        REGISTER_STREAM_CONSUMER_DURATION=0ms \
        DEREGISTER_STREAM_CONSUMER_DURATION=0ms \
        MERGE_SHARDS_DURATION=0ms \
        SPLIT_SHARD_DURATION=0ms \
        UPDATE_SHARD_COUNT_DURATION=0ms \
        SHARD_LIMIT=1000 \
        LOG_LEVEL=WARN \
        "${detach[@]}" nohup sh -c 'echo $$ >"$1"; shift; exec "$@"' sh \
            "$pid_file" node "$pkg_dir/main.js" >"$log" 2>&1 </dev/null &
    ) || return 1

    # The child writes its own pid (setsid may fork, so $! is not reliable).
    local start=$SECONDS pid=""
    until kt_http_answers "$KINESIS_MOCK_PORT"; do
        if [ -z "$pid" ] && [ -s "$pid_file" ]; then
            pid=$(cat "$pid_file")
        fi
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            kt_log "kinesis-mock (pid $pid) exited during startup; log follows"
            cat "$log" >&2
            return 1
        fi
        if [ $((SECONDS - start)) -ge 60 ]; then
            kt_log "kinesis-mock not answering on port $KINESIS_MOCK_PORT after 60s; log follows"
            cat "$log" >&2
            return 1
        fi
        sleep 0.2
    done
    kt_log "kinesis-mock ready (pid $pid, $((SECONDS - start))s)"
}

kt_pg_ready() {
    if command -v pg_isready >/dev/null 2>&1; then
        pg_isready -q -h 127.0.0.1 -p 5432
    else
        kt_port_open 5432
    fi
}

ensure_postgres() {
    kt_pg_ready && return 0
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
        kt_log "installing postgresql with apt"
        kt_apt_install postgresql || return 1
    fi
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    kt_log "starting PostgreSQL $version"
    kt_as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    kt_wait_for "PostgreSQL on 127.0.0.1:5432" 60 kt_pg_ready
}

ensure_mariadb() {
    kt_port_open 3306 && return 0
    if [ ! -x /usr/sbin/mariadbd ]; then
        kt_log "installing mariadb-server with apt"
        kt_apt_install mariadb-server || return 1
        kt_port_open 3306 && return 0
    fi
    kt_log "starting MariaDB"
    kt_as_root mkdir -p /run/mysqld
    kt_as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
    kt_as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd || return 1
    kt_wait_for "MariaDB on 127.0.0.1:3306" 60 kt_port_open 3306
}

kt_redis_ready() {
    if command -v redis-cli >/dev/null 2>&1; then
        [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]
    else
        kt_port_open 6379
    fi
}

ensure_redis() {
    kt_redis_ready && return 0
    if ! command -v redis-server >/dev/null 2>&1; then
        kt_log "installing redis-server with apt"
        kt_apt_install redis-server || return 1
        kt_redis_ready && return 0
    fi
    kt_log "starting Redis"
    kt_as_root mkdir -p /var/lib/redis /var/log/redis
    kt_as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
        --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || return 1
    kt_wait_for "Redis on 127.0.0.1:6379" 30 kt_redis_ready
}

# kt_npm_pkg <name> <version>: installs an npm package into .emulators/<name> (once; a prefix of
# its own, since `npm install --no-save` prunes whatever else is in a prefix), prints its directory.
kt_npm_pkg() {
    local name=$1 version=$2
    local prefix="$KT_EMULATOR_DIR/$name"
    local pkg_dir="$prefix/node_modules/$name"
    ensure_node || return 1
    local installed=""
    if [ -f "$pkg_dir/package.json" ]; then
        installed=$(node -p "require(process.argv[1]).version" "$pkg_dir/package.json" 2>/dev/null || true)
    fi
    if [ "$installed" != "$version" ]; then
        kt_log "installing $name@$version into $prefix"
        mkdir -p "$prefix" || return 1
        npm install --no-save --no-package-lock --no-audit --no-fund \
            --prefix "$prefix" "$name@$version" >&2 || return 1
    fi
    echo "$pkg_dir"
}

# kt_start_node <name> <port> <log> <node args...>: starts a node server detached, waits for HTTP.
kt_start_node() {
    local name=$1 port=$2 log=$3
    shift 3
    mkdir -p "$KT_EMULATOR_LOG_DIR" || return 1
    local pid_file="$KT_EMULATOR_LOG_DIR/$name.pid"
    rm -f "$pid_file"
    kt_log "starting $name on 127.0.0.1:$port (log: $log)"
    local detach=()
    if command -v setsid >/dev/null 2>&1; then detach=(setsid); fi
    (
        cd "$KT_EMULATOR_DIR" || exit 1
        "${detach[@]}" nohup sh -c 'echo $$ >"$1"; shift; exec "$@"' sh \
            "$pid_file" node "$@" >"$log" 2>&1 </dev/null &
    ) || return 1
    local start=$SECONDS pid=""
    until kt_http_answers "$port"; do
        if [ -z "$pid" ] && [ -s "$pid_file" ]; then pid=$(cat "$pid_file"); fi
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            kt_log "$name (pid $pid) exited during startup; log follows"
            cat "$log" >&2
            return 1
        fi
        if [ $((SECONDS - start)) -ge 60 ]; then
            kt_log "$name not answering on port $port after 60s; log follows"
            cat "$log" >&2
            return 1
        fi
        sleep 0.2
    done
    kt_log "$name ready ($((SECONDS - start))s)"
}

# dynalite (DynamoDB emulator), 127.0.0.1:4568.
DYNALITE_VERSION=4.0.0
DYNALITE_PORT=4568
export DYNALITE_ENDPOINT="http://127.0.0.1:${DYNALITE_PORT}"
export AWS_ENDPOINT_URL_DYNAMODB="${AWS_ENDPOINT_URL_DYNAMODB:-$DYNALITE_ENDPOINT}"
ensure_dynalite() {
    kt_http_answers "$DYNALITE_PORT" && return 0
    local dir
    dir=$(kt_npm_pkg dynalite "$DYNALITE_VERSION") || return 1
    kt_start_node dynalite "$DYNALITE_PORT" "$KT_EMULATOR_LOG_DIR/dynalite.log" \
        "$dir/cli.js" --host 127.0.0.1 --port "$DYNALITE_PORT" \
        --createTableMs 0 --deleteTableMs 0 --updateTableMs 0
}

# kinesalite (Kinesis emulator used for volume and crash tests), 127.0.0.1:4567.
KINESALITE_VERSION=3.3.3
KINESALITE_PORT=4567
export KINESALITE_ENDPOINT="http://127.0.0.1:${KINESALITE_PORT}"
ensure_kinesalite() {
    kt_http_answers "$KINESALITE_PORT" && return 0
    local dir
    dir=$(kt_npm_pkg kinesalite "$KINESALITE_VERSION") || return 1
    # Its command line binds every interface; bind loopback from node instead.
    kt_start_node kinesalite "$KINESALITE_PORT" "$KT_EMULATOR_LOG_DIR/kinesalite.log" \
        -e "require(process.argv[1])({createStreamMs:0,deleteStreamMs:0,updateStreamMs:0,shardLimit:1000}).listen(${KINESALITE_PORT},'127.0.0.1')" \
        "$dir"
}

# A Python venv with the reference KPL aggregation library (aws-kinesis-agg), for interop tests.
KPL_PYTHON_PACKAGES="aws-kinesis-agg==1.2.3 protobuf==4.25.3 six==1.17.0"
ensure_kpl_python() {
    local venv="$KT_REPO/.venv"
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import aws_kinesis_agg.aggregator, aws_kinesis_agg.deaggregator' 2>/dev/null; then
        local py
        py=$(command -v python3 || true)
        if [ -z "$py" ]; then
            kt_log "installing python3 with apt"
            kt_apt_install python3 python3-venv || return 1
            py=$(command -v python3)
        fi
        if ! "$py" -m venv "$venv" >/dev/null 2>&1; then
            kt_apt_install python3-venv || return 1
            "$py" -m venv "$venv" || return 1
        fi
        kt_log "installing $KPL_PYTHON_PACKAGES into $venv"
        # shellcheck disable=SC2086
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $KPL_PYTHON_PACKAGES >&2 || return 1
    fi
    export KT_PYTHON="$venv/bin/python"
}
