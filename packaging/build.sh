#!/usr/bin/env bash
# Builds the Debian and RPM packages flame-head, flame-node and flame-cli into
# target/packages/ (see packaging/README.md).
#
#   packaging/build.sh [--profile PROFILE] [--no-build] [--out DIR]
#
# --profile  cargo profile of the binaries (default: release); `dev` packs target/debug,
#            as the test suite does with the binaries it has already built
# --no-build use the binaries already built for that profile instead of running cargo build
# --out      where the packages go (default: target/packages)
#
# Needs cargo-deb and cargo-generate-rpm (.ci/run installs the versions it pins), strip
# and gzip. The binaries are stripped and staged, with the man pages and completion
# scripts each binary writes from its clap definition (`generate-docs`), in
# <target>/<profile>/packaging/, where both tools read them as target/release/packaging/.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

profile=release
build=1
out=target/packages
while (($# > 0)); do
  case "$1" in
    --profile) profile=${2:?--profile needs a name}; shift 2 ;;
    --no-build) build=0; shift ;;
    --out) out=${2:?--out needs a folder}; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1'" >&2; echo "hint: packaging/build.sh --help" >&2; exit 2 ;;
  esac
done

for tool in cargo-deb cargo-generate-rpm strip gzip; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "error: $tool is not on PATH" >&2
    echo "hint: cargo install --locked cargo-deb@3.8.0 cargo-generate-rpm@0.21.1 (binutils and gzip for strip and gzip)" >&2
    exit 1
  fi
done

target_dir=${CARGO_TARGET_DIR:-target}
case "$profile" in
  dev) profile_dir=debug ;;
  *) profile_dir=$profile ;;
esac
bin_dir=$target_dir/$profile_dir
# Flame's programs in the packages: the daemons, the client, and the helpers that run on
# nodes (built-in ping and shell applications, Open MPI's launch agent).
binaries=(flame-head flame-node flame-ping flame-shell flame-mpi-agent flame flame-shim-check)

if ((build)); then
  cargo build --locked --profile "$profile" -p flame-head -p flame-node -p flame-cli -p flame-shims --bins
fi

stage=$bin_dir/packaging
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/docs"
for binary in "${binaries[@]}"; do
  if [[ ! -x $bin_dir/$binary ]]; then
    echo "error: $bin_dir/$binary is missing" >&2
    echo "hint: build it first (cargo build --profile $profile --bins), or drop --no-build" >&2
    exit 1
  fi
  # Debian policy: no debug symbols in the package (cargo-generate-rpm does not strip).
  strip --strip-unneeded --remove-section=.comment -o "$stage/bin/$binary" "$bin_dir/$binary"
done
for binary in flame flame-head flame-node; do
  "$stage/bin/$binary" generate-docs --out "$stage/docs"
done
# -n: no name or time stamp in the archives, so builds are reproducible.
gzip -9n "$stage"/docs/man*/*

mkdir -p "$out"
for package in flame-head flame-node flame-cli; do
  cargo deb --locked -p "$package" --no-build --profile "$profile" --output "$out/"
  cargo generate-rpm -p "$package" --profile "$profile" --output "$out/"
done
ls -l "$out"
