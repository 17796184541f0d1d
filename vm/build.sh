#!/usr/bin/env bash
# Builds the ringlb test VM's kernel and base initramfs from Debian bookworm packages only.
#
#   vm/build.sh [--refresh] OUTDIR
#
# Produces OUTDIR/vmlinuz (Debian's bzImage), OUTDIR/vmlinux (the same kernel decompressed: booted
# through its PVH entry it skips the ~2.5 s xz decompression that TCG emulation makes slow),
# OUTDIR/base.cpio (static busybox, vm/init, the kernel modules SCTP needs) and OUTDIR/kernel.txt.
# The kernel .deb is fetched with `apt-get download` (nothing is installed) and cached in
# ${RINGLB_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ringlb-vm}. A rerun whose inputs (these scripts,
# busybox, the module list) did not change does nothing and keeps the kernel it built with; --refresh
# asks apt for the current kernel first. Without network the newest cached kernel is used.
#
# Environment:
#   RINGLB_VM_KERNEL_PACKAGE  pin the package (e.g. linux-image-6.1.0-56-amd64) instead of resolving
#                             the current dependency of linux-image-amd64
#   RINGLB_VM_MODULES         extra module names to load in the guest (e.g. "veth dummy")
set -euo pipefail
# shellcheck source=vm/lib.sh
source "$(dirname "$0")/lib.sh"

refresh=""
if [[ ${1:-} == --refresh ]]; then
  refresh=yes
  shift
fi
(($# == 1)) || {
  echo "usage: $0 [--refresh] OUTDIR" >&2
  exit 2
}
out=$1

# sctp and its dependencies are found through the modules' own metadata; crc32c_generic is named
# because libcrc32c only asks for "crc32c" through the crypto API (a softdep), which nothing in the
# guest would resolve.
read -r -a extra_modules <<<"${RINGLB_VM_MODULES:-}"
root_modules=(sctp crc32c_generic "${extra_modules[@]}")
# Soft dependencies name crypto algorithms rather than modules; map the ones we meet.
declare -A softdep_alias=([crc32c]=crc32c_generic)

for tool in dpkg-deb:dpkg tar:tar xz:xz-utils cpio:cpio busybox:busybox-static apt-get:apt flock:util-linux; do
  vm_need "${tool%%:*}" "${tool#*:}"
done
busybox_path=$(command -v busybox)
if ldd "$busybox_path" >/dev/null 2>&1; then
  vm_die "$busybox_path is dynamically linked; install busybox-static (it replaces busybox)"
fi

deb_dir=$VM_CACHE_DIR/debs
mkdir -p "$deb_dir" "$out"
# Parallel run.sh calls (e.g. two CI steps) must not build into the same directory at once.
exec 9>"$out/.lock"
flock -w 600 9 || vm_die "timed out waiting for another build of $out"

# --- up to date? --------------------------------------------------------------------------------
# Without --refresh an existing build keeps its kernel (no apt query, ~10 ms): the kernel under test
# changes only when someone asks for it or the output directory is new (as in CI).
inputs_hash=$(cat "$VM_SCRIPTS_DIR/build.sh" "$VM_SCRIPTS_DIR/lib.sh" "$VM_SCRIPTS_DIR/init" "$busybox_path" |
  sha256sum | cut -d' ' -f1)
stamp_for() { echo "deb=$1 modules=${root_modules[*]} inputs=$inputs_hash"; }
up_to_date() {
  [[ -f $out/stamp && $(cat "$out/stamp") == "$(stamp_for "$1")" && -f $out/base.cpio && -f $out/vmlinuz ]]
}
built_deb=$(sed -n 's/^deb=\([^ ]*\) .*/\1/p' "$out/stamp" 2>/dev/null || true)
if [[ -z $refresh && -n $built_deb && $built_deb == "${RINGLB_VM_KERNEL_PACKAGE:-linux-image-}"* ]] &&
  up_to_date "$built_deb"; then
  vm_log "up to date: $out ($built_deb)"
  exit 0
fi

# --- which kernel package -------------------------------------------------------------------------
resolve_package() {
  if [[ -n ${RINGLB_VM_KERNEL_PACKAGE:-} ]]; then
    echo "$RINGLB_VM_KERNEL_PACKAGE"
    return
  fi
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}

newest_cached_deb() {
  local pattern=${1:-linux-image-*-amd64}
  find "$deb_dir" -maxdepth 1 -name "${pattern}_*_amd64.deb" -printf '%f\n' | sort -V | tail -n 1
}

apt_download() {
  local package=$1 tmp
  tmp=$(mktemp -d "$deb_dir/.download.XXXXXX")
  local sandbox=()
  # As root, apt drops to the _apt user, which cannot write into a directory under root's $HOME.
  ((EUID == 0)) && sandbox=(-o APT::Sandbox::User=root)
  if (cd "$tmp" && apt-get download -q "${sandbox[@]}" "$package" >&2); then
    mv "$tmp"/*.deb "$deb_dir/"
    rmdir "$tmp"
    return 0
  fi
  rm -rf "$tmp"
  return 1
}

# fetch_deb: prints the cached .deb file name for the current candidate, downloading it if needed;
# prints nothing when apt cannot resolve or download it.
fetch_deb() {
  local package version deb
  package=$(resolve_package || true)
  [[ -n $package ]] || return 0
  version=$(apt-cache policy "$package" 2>/dev/null | awk '$1 == "Candidate:" { print $2; exit }' || true)
  [[ -n $version && $version != "(none)" ]] || return 0
  deb="${package}_${version//:/%3a}_amd64.deb"
  if [[ ! -f $deb_dir/$deb ]]; then
    vm_log "downloading $package $version"
    apt_download "$package" || return 0
  fi
  if [[ -f $deb_dir/$deb ]]; then
    echo "$deb"
  fi
}

deb=$(fetch_deb)
if [[ -z $deb ]] && ((EUID == 0)); then
  # Missing or stale package lists (a version the archive no longer has): refresh them once.
  vm_log "apt could not provide the kernel package; running apt-get update and retrying"
  timeout 180 apt-get update -qq >&2 || true
  deb=$(fetch_deb)
fi
if [[ -z $deb ]]; then
  deb=$(newest_cached_deb "${RINGLB_VM_KERNEL_PACKAGE:-}")
  [[ -n $deb ]] || vm_die "cannot resolve or download a Debian kernel package (run apt-get update?) and none is cached in $deb_dir"
  vm_log "apt could not provide ${RINGLB_VM_KERNEL_PACKAGE:-the kernel of linux-image-amd64}; using cached $deb"
fi

if up_to_date "$deb"; then
  vm_log "up to date: $out ($deb)"
  exit 0
fi

# --- extract ------------------------------------------------------------------------------------
vm_log "building $out from $deb"
rm -f "$out/stamp"
work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# SCTP's closure lives under net/, lib/ and crypto/; skipping drivers/ and the rest saves writing
# ~350 MB. Extra modules may live anywhere, so asking for them extracts the whole tree.
module_globs=('./lib/modules/*/modules.*' './lib/modules/*/kernel/net/*' './lib/modules/*/kernel/lib/*'
  './lib/modules/*/kernel/crypto/*' './lib/modules/*/kernel/arch/*')
[[ -z ${RINGLB_VM_MODULES:-} ]] || module_globs=('./lib/modules/*')
dpkg-deb --fsys-tarfile "$deb_dir/$deb" | tar -x -C "$work" --wildcards './boot/vmlinuz-*' "${module_globs[@]}"
kernel_release=$(basename "$(find "$work/lib/modules" -mindepth 1 -maxdepth 1 -type d | head -n 1)")
module_dir=$work/lib/modules/$kernel_release
[[ -f $module_dir/modules.order ]] || vm_die "$deb has no modules.order"

cp "$work/boot/vmlinuz-$kernel_release" "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
# The bzImage is a small decompressor followed by an xz stream holding the vmlinux ELF.
xz_offset=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$out/vmlinuz" | head -n 1 | cut -d: -f1 || true)
rm -f "$out/vmlinux"
decompressed=""
if [[ -n $xz_offset ]]; then
  # xz stops after the first stream, so tail dies of SIGPIPE: only xz's status counts here.
  set +o pipefail
  tail -c +"$((xz_offset + 1))" "$out/vmlinuz" | xz -dc --single-stream >"$out/vmlinux.tmp" 2>/dev/null &&
    decompressed=yes
  set -o pipefail
fi
if [[ -n $decompressed && $(head -c 4 "$out/vmlinux.tmp" | od -An -tx1 | tr -d ' \n') == 7f454c46 ]]; then
  mv "$out/vmlinux.tmp" "$out/vmlinux"
else
  rm -f "$out/vmlinux.tmp"
  vm_log "could not decompress vmlinuz into an ELF vmlinux; run.sh will boot the (slower) bzImage"
fi

# --- module closure, dependencies first ------------------------------------------------------------
module_path() { # NAME -> path relative to the module dir, empty when built in or unknown
  awk -v want="${1//-/_}" '{ n = $0; sub(/.*\//, "", n); sub(/\.ko.*$/, "", n); gsub(/-/, "_", n); if (n == want) { print; exit } }' \
    "$module_dir/modules.order"
}
module_builtin() {
  awk -v want="${1//-/_}" '{ n = $0; sub(/.*\//, "", n); sub(/\.ko.*$/, "", n); gsub(/-/, "_", n); if (n == want) found = 1 } END { exit !found }' \
    "$module_dir/modules.builtin"
}
module_info() { # RELPATH FIELD -> values of FIELD in the module's .modinfo strings
  local file=$module_dir/$1
  case $file in
  *.xz) xz -dc "$file" ;;
  *.zst) zstd -dcq "$file" ;;
  *) cat "$file" ;;
  esac | tr '\0' '\n' | sed -n "s/^$2=//p"
}

declare -A visiting=() done_modules=()
load_order=()
add_module() {
  local name=${1//-/_} path dep
  [[ -z ${done_modules[$name]:-} ]] || return 0
  [[ -z ${visiting[$name]:-} ]] || vm_die "module dependency cycle at $name"
  if module_builtin "$name"; then
    done_modules[$name]=builtin
    return 0
  fi
  path=$(module_path "$name")
  [[ -n $path ]] || vm_die "module $name is neither built into $kernel_release nor shipped in $deb"
  visiting[$name]=1
  for dep in $(module_info "$path" depends | tr ',' ' '); do
    add_module "$dep"
  done
  # "softdep=pre: a b post: c": load the pre ones first; post ones are optional extras we skip.
  for dep in $(module_info "$path" softdep | sed -n 's/^pre:\(.*\)/\1/p' | sed 's/post:.*//'); do
    add_module "${softdep_alias[$dep]:-$dep}"
  done
  unset "visiting[$name]"
  done_modules[$name]=$path
  load_order+=("$path")
}
for module in "${root_modules[@]}"; do
  add_module "$module"
done

# --- base initramfs -----------------------------------------------------------------------------
root=$work/root
mkdir -p "$root"/{bin,dev,etc/ringlb-vm,proc,root,run,sys,tmp,ringlb-vm}
cp "$busybox_path" "$root/bin/busybox"
install -m 0755 "$VM_SCRIPTS_DIR/init" "$root/init"
for path in "${load_order[@]}"; do
  mkdir -p "$root/lib/modules/$kernel_release/$(dirname "$path")"
  cp "$module_dir/$path" "$root/lib/modules/$kernel_release/$path"
done
printf '%s\n' "${load_order[@]}" >"$root/etc/ringlb-vm/modules"
# glibc resolves "localhost" through these; its files backend is built in (no libnss_* needed).
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
printf 'passwd: files\ngroup: files\nhosts: files\n' >"$root/etc/nsswitch.conf"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$root/etc/group"
find "$root" -exec touch -h -d @0 {} +
vm_pack_cpio "$root" "$out/base.cpio.tmp"
mv "$out/base.cpio.tmp" "$out/base.cpio"

{
  echo "deb=$deb"
  echo "kernel_release=$kernel_release"
  echo "modules=${load_order[*]}"
} >"$out/kernel.txt"
stamp_for "$deb" >"$out/stamp"
vm_log "built $out: kernel $kernel_release, modules: ${load_order[*]}"
