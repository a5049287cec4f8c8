# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are used by the scripts that source this file
# Shared helpers of the resources/ scripts. Sourced, never executed.
#
# Layout of the build tree (git-ignored, under <workspace>/build unless RVMM_BUILD_DIR says otherwise):
#   build/kernel/current/        the Debian kernel in use (symlink to build/kernel/<package>_<version>)
#     vmlinuz                    bzImage (test host kernel and guest bzImage)
#     vmlinux                    ELF cut out of the bzImage (guest PVH entry)
#     release                    kernel release string, e.g. 6.12.95+deb12-amd64
#     root/lib/modules/<rel>/    the package's modules (.ko.xz) with modules.dep
#   build/images/guest-initramfs.cpio.gz
#   build/images/host-initramfs.cpio
#   build/stamps/                input hashes that decide whether an image is up to date
#   build/logs/, build/run/      test host consoles and per-run scratch files

RESOURCES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORKSPACE_DIR="$(cd "$RESOURCES_DIR/.." && pwd)"
BUILD_DIR="${RVMM_BUILD_DIR:-$WORKSPACE_DIR/build}"
KERNEL_DIR="$BUILD_DIR/kernel/current"
IMAGES_DIR="$BUILD_DIR/images"
STAMPS_DIR="$BUILD_DIR/stamps"
# The workspace's rust-version (Cargo.toml): the oldest Rust that builds it.
RUST_VERSION="$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' "$WORKSPACE_DIR/Cargo.toml")"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# use_cargo: makes cargo and rustc callable, or fails saying how. rustup's toolchain is used when
# there is one ($HOME/.cargo/bin joins PATH when cargo is not on it). Otherwise, on Debian 12,
# Debian's cargo-web and rustc-web packages are installed (Rust 1.96 from bookworm-security; the
# workspace's rust-version is 1.85): as root, or through sudo. Elsewhere it fails.
use_cargo() {
  if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null; then
    local codename="" sudo=""
    # shellcheck source=/dev/null
    [ -r /etc/os-release ] && codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
    [ "$codename" = bookworm ] ||
      die "cargo is not installed: install Rust ${RUST_VERSION} or later (rustup, or the distribution's cargo and rustc)"
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    log "cargo is not installed and there is no rustup toolchain: installing Debian's cargo-web and rustc-web with apt-get"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cargo-web rustc-web
    command -v cargo >/dev/null || die "cargo is still missing after installing cargo-web"
    log "installed $(cargo --version)"
  fi
  local version
  version="$(rustc --version 2>/dev/null | awk '{ print $2 }')" || true
  [ -n "$version" ] || die "cargo is at $(command -v cargo), but rustc does not run"
  version_at_least "${version%%-*}" "$RUST_VERSION" ||
    die "rustc $version is older than the workspace's rust-version $RUST_VERSION: update the toolchain (rustup update, or Debian's cargo-web and rustc-web)"
}

# version_at_least VERSION MINIMUM: true if the dotted version VERSION is MINIMUM or later.
version_at_least() {
  [ -n "$1" ] && [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

# median NUMBER...: prints the median of the numbers (the mean of the middle two for an even
# count); fails, printing nothing, when none is given.
median() {
  [ "$#" -gt 0 ] || return 1
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Prints the release string of the kernel in build/kernel/current, or fails.
kernel_release() {
  [ -s "$KERNEL_DIR/release" ] || die "no guest kernel in $KERNEL_DIR: run resources/guest-kernel.sh"
  cat "$KERNEL_DIR/release"
}

# Prints one hash over the given files (their content, not their paths, so that the way a script
# was invoked does not matter) and strings (prefixed with '='): the inputs of a cached artifact. A
# missing file hashes as "missing" so that its later appearance changes the stamp.
inputs_hash() {
  local item
  for item in "$@"; do
    case "$item" in
      =*) printf 'str %s\n' "${item#=}" ;;
      *)
        if [ -f "$item" ]; then
          printf 'file %s\n' "$(sha256sum <"$item" | cut -d' ' -f1)"
        else
          printf 'file missing\n'
        fi
        ;;
    esac
  done | sha256sum | cut -d' ' -f1
}

# stamp_is_current NAME HASH OUTPUT: true if OUTPUT exists and was built from inputs hashing to HASH.
stamp_is_current() {
  [ -e "$3" ] && [ -f "$STAMPS_DIR/$1" ] && [ "$(cat "$STAMPS_DIR/$1")" = "$2" ]
}

# stamp_write NAME HASH: records that the artifact NAME is now built from inputs hashing to HASH.
stamp_write() {
  mkdir -p "$STAMPS_DIR"
  printf '%s\n' "$2" >"$STAMPS_DIR/$1"
}

# copy_modules DEST MODULE...: copies MODULEs and everything they depend on from the kernel package
# into DEST/lib/modules/<rel>/ decompressed (busybox insmod/modprobe cannot read .ko.xz), then
# writes modules.dep there with depmod so that busybox modprobe resolves the load order at boot.
# A module that is built into the kernel is accepted and skipped.
copy_modules() {
  local dest="$1" rel root line path relpath target module
  shift
  rel="$(kernel_release)"
  root="$KERNEL_DIR/root"
  mkdir -p "$dest/lib/modules/$rel"
  for module in "$@"; do
    local deps
    deps="$(modprobe -d "$root" -S "$rel" --show-depends "$module" 2>&1)" ||
      die "kernel $rel has no module $module: $deps"
    while IFS= read -r line; do
      case "$line" in
        builtin\ *) continue ;;
        insmod\ *)
          path="$(printf '%s\n' "$line" | cut -d' ' -f2)"
          relpath="${path#"$root/lib/modules/$rel/"}"
          case "$relpath" in /*) die "module path $path lies outside $root" ;; esac
          target="$dest/lib/modules/$rel/${relpath%.xz}"
          target="${target%.zst}"
          [ -f "$target" ] && continue
          mkdir -p "$(dirname "$target")"
          case "$path" in
            *.xz) xz -dc "$path" >"$target" ;;
            *.zst) zstd -qdc "$path" >"$target" ;;
            *) cp "$path" "$target" ;;
          esac
          ;;
        *) die "unexpected modprobe output for $module: $line" ;;
      esac
    done <<<"$deps"
  done
  cp "$root/lib/modules/$rel/modules.builtin" "$root/lib/modules/$rel/modules.builtin.modinfo" \
    "$dest/lib/modules/$rel/"
  (cd "$dest/lib/modules/$rel" && find kernel -name '*.ko' | LC_ALL=C sort >modules.order)
  depmod -b "$dest" "$rel"
}

# Prints cargo's target directory: $CARGO_TARGET_DIR (relative to the workspace when relative) or
# <workspace>/target.
cargo_target_dir() {
  local target="${CARGO_TARGET_DIR:-$WORKSPACE_DIR/target}"
  case "$target" in /*) ;; *) target="$WORKSPACE_DIR/$target" ;; esac
  printf '%s\n' "$target"
}

# Prints the rvmm binary to test: $RVMM_BIN, else <cargo target dir>/release/rvmm.
rvmm_binary() {
  if [ -n "${RVMM_BIN:-}" ]; then
    printf '%s\n' "$RVMM_BIN"
    return 0
  fi
  printf '%s\n' "$(cargo_target_dir)/release/rvmm"
}

# Prints the path of the statically linked busybox (package busybox-static), or fails.
static_busybox() {
  local busybox=/bin/busybox
  [ -x "$busybox" ] || die "$busybox is missing: run resources/install-deps.sh (busybox-static)"
  if ldd "$busybox" >/dev/null 2>&1; then
    die "$busybox is dynamically linked: install busybox-static instead of busybox"
  fi
  printf '%s\n' "$busybox"
}

# copy_binary DEST BINARY [NAME]: copies an executable to DEST/bin/NAME together with the shared
# libraries and the dynamic loader it needs (paths kept, so the loader finds them).
copy_binary() {
  local dest="$1" bin="$2" name="${3:-$(basename "$2")}" lib
  mkdir -p "$dest/bin"
  install -m 0755 "$bin" "$dest/bin/$name"
  # ldd prints "libx.so => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)"; a static
  # binary makes it fail with "not a dynamic executable".
  if ldd "$bin" >/dev/null 2>&1; then
    for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
      mkdir -p "$dest$(dirname "$lib")"
      cp -L "$lib" "$dest$lib"
    done
  fi
}
