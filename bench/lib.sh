# Shared by the bench scripts (sourced).

# The Rust SecantusDB server (`secantusd-rs`, a MongoDB-wire server): $SECANTUSD, or on the
# PATH, or installed now with cargo (needs cmake; about 4 minutes). Prints its path.
secantus_bin() {
  local bin="${SECANTUSD:-$(command -v secantusd-rs || echo "$HOME/.cargo/bin/secantusd-rs")}"
  if [ ! -x "$bin" ]; then
    command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }
    cargo install secantus-mdb --version 0.5.3-beta.196 --locked --ignore-rust-version >&2
    bin="$HOME/.cargo/bin/secantusd-rs"
  fi
  echo "$bin"
}

# Waits until 127.0.0.1:$1 accepts connections (at most 20 s).
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
