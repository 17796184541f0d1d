# Shared by vm/build.sh and vm/run.sh (sourced, never executed): messages, default locations, and
# copying an ELF file into a staging root together with the shared libraries it needs.
# Must never touch anything outside the staging, output and cache directories it is given.
# shellcheck shell=bash disable=SC2034  # the variables below are used by the scripts sourcing this

VM_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM_REPO_DIR=$(cd "$VM_SCRIPTS_DIR/.." && pwd)
# Where build.sh writes the kernel and base initramfs when run.sh builds them on demand.
VM_DEFAULT_DIR=${RINGLB_VM_DIR:-$VM_REPO_DIR/target/vm}
# Downloaded .deb files live here so rebuilds (and a wiped target/) need no network.
VM_CACHE_DIR=${RINGLB_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ringlb-vm}

vm_log() { printf 'ringlb-vm: %s\n' "$*" >&2; }
vm_die() {
  printf 'ringlb-vm: error: %s\n' "$*" >&2
  exit 1
}

# vm_need COMMAND APT_PACKAGE: fail early with the package to install instead of a confusing error later.
vm_need() {
  command -v "$1" >/dev/null 2>&1 || vm_die "'$1' not found; install it with: apt-get install $2"
}

# vm_copy_into ROOT FILE: copies FILE to ROOT at the same absolute path (symlinks dereferenced).
vm_copy_into() {
  local root=$1 file=$2
  mkdir -p "$root$(dirname "$file")"
  cp -L --preserve=mode "$file" "$root$file"
}

# vm_copy_elf_with_libs ROOT FILE: copies FILE and, when it is dynamically linked, every library ldd
# resolves plus the dynamic loader, each at its host path. glibc's loader searches the Debian multiarch
# directories by default, so no ld.so.cache is needed in the guest.
vm_copy_elf_with_libs() {
  local root=$1 file=$2 deps lib
  vm_copy_into "$root" "$file"
  # ldd exits non-zero for static executables and for non-ELF files: both need nothing more.
  deps=$(ldd "$file" 2>/dev/null) || return 0
  while read -r lib; do
    [[ -n $lib && -e $lib ]] || continue
    [[ -e $root$lib ]] || vm_copy_into "$root" "$lib"
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$deps")
}

# vm_pack_cpio DIR OUTFILE: writes DIR as an uncompressed newc archive owned by root. Uncompressed on
# purpose: under TCG the guest decompresses slowly, while copying a few more MB costs nothing.
vm_pack_cpio() {
  local dir=$1 out=$2
  (cd "$dir" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) >"$out"
}
