# shellcheck shell=bash
# Shared by the scripts in scripts/wsl2/: messages, and every change to the host made through
# `run`, which under --dry-run prints the command instead of running it.
DRY_RUN=${DRY_RUN:-0}

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { printf '%s: error: %s\n' "${0##*/}" "$*" >&2; exit 1; }

# run CMD...: the command, or under --dry-run the line `would run: CMD...` on stdout.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf 'would run:'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# write_file FILE [--append] <text: FILE gets the text (added at its end with --append); under
# --dry-run the text is shown instead.
write_file() {
  if [ "$DRY_RUN" = 1 ]; then
    printf 'would write%s %s:\n' "${2:+ (append)}" "$1"
    sed 's/^/    /'
  elif [ "${2:-}" = --append ]; then
    cat >>"$1"
  else
    cat >"$1"
  fi
}

# The repository root (scripts/wsl2/ is two below it).
repo_root() { cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd; }
