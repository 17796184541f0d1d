#!/usr/bin/env bash
# Runs one host command inside the ringlb test VM (Debian's 6.1 kernel with SCTP, under qemu TCG) and
# exits with that command's exit code.
#
#   vm/run.sh [--timeout SECS] [--cpus N] [--mem MB] [--add PATH]... [--env NAME=VALUE]...
#             [--cwd DIR] [--vm-dir DIR] [--accel tcg|kvm] -- COMMAND [ARGS...]
#
# COMMAND (a path, or a name found on PATH) and every --add PATH are copied into the guest at their
# host paths, ELF files with the shared libraries ldd finds; a directory is copied whole. The guest has
# only a loopback interface. Console output streams to stdout as it happens. Exit codes: the
# command's own; 124 when --timeout expired (qemu is killed); 125 when the guest ended without
# reporting an exit code (kernel panic, setup failure); 2 for a usage error.
#
# The kernel and base initramfs come from vm/build.sh, run on demand into ${RINGLB_VM_DIR:-target/vm}.
# RUST_BACKTRACE, RUST_LOG, RUST_TEST_THREADS and RUST_MIN_STACK are passed through when set.
set -euo pipefail
# shellcheck source=vm/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  sed -n '5,6p' "$0" | sed 's/^# *//' >&2
  exit 2
}

timeout_secs=300
cpus=2
mem_mb=1024
accel=tcg
vm_dir=$VM_DEFAULT_DIR
guest_cwd=/
adds=()
envs=()
while (($#)); do
  case $1 in
  --timeout) timeout_secs=${2:?--timeout needs seconds}; shift 2 ;;
  --cpus) cpus=${2:?--cpus needs a count}; shift 2 ;;
  --mem) mem_mb=${2:?--mem needs megabytes}; shift 2 ;;
  --add) adds+=("${2:?--add needs a path}"); shift 2 ;;
  --env) envs+=("${2:?--env needs NAME=VALUE}"); shift 2 ;;
  --cwd) guest_cwd=${2:?--cwd needs a directory}; shift 2 ;;
  --vm-dir) vm_dir=${2:?--vm-dir needs a directory}; shift 2 ;;
  --accel) accel=${2:?--accel needs tcg or kvm}; shift 2 ;;
  --) shift; break ;;
  -h | --help) usage ;;
  *) echo "unknown option: $1" >&2; usage ;;
  esac
done
(($#)) || usage
[[ $timeout_secs =~ ^[1-9][0-9]*$ ]] || vm_die "--timeout must be a positive number of seconds"
[[ $cpus =~ ^[1-9][0-9]*$ ]] || vm_die "--cpus must be a positive count"
[[ $mem_mb =~ ^[1-9][0-9]*$ ]] || vm_die "--mem must be a positive number of megabytes"
[[ $accel == tcg || $accel == kvm ]] || vm_die "--accel must be tcg or kvm"
for env in "${envs[@]}"; do
  [[ $env =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || vm_die "--env wants NAME=VALUE, got '$env'"
done
for name in RUST_BACKTRACE RUST_LOG RUST_TEST_THREADS RUST_MIN_STACK; do
  [[ -z ${!name:-} ]] || envs+=("$name=${!name}")
done

vm_need qemu-system-x86_64 qemu-system-x86
vm_need cpio cpio
vm_need timeout coreutils

# The guest sees files at their host paths, so everything is made absolute first.
absolute() {
  local path=$1
  [[ $path == */* ]] || path=$(command -v "$path") || vm_die "'$1' is not a file and not on PATH"
  [[ -e $path ]] || vm_die "'$path' does not exist"
  echo "$(cd "$(dirname "$path")" && pwd -P)/$(basename "$path")"
}
command_path=$(absolute "$1")
shift

"$VM_SCRIPTS_DIR/build.sh" "$vm_dir" 2>&1 | grep -v '^ringlb-vm: up to date' >&2 || true
[[ -f $vm_dir/stamp ]] || vm_die "vm/build.sh did not produce $vm_dir"
# Booting the decompressed kernel through its PVH entry saves ~2.5 s of emulated xz decompression.
kernel=$vm_dir/vmlinux
[[ -f $kernel ]] || kernel=$vm_dir/vmlinuz

work=$(mktemp -d "${TMPDIR:-/tmp}/ringlb-vm.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

# --- overlay initramfs: the command, its libraries, extra paths, the command script -----------------
overlay=$work/overlay
mkdir -p "$overlay/ringlb-vm"
vm_copy_elf_with_libs "$overlay" "$command_path"
for add in "${adds[@]}"; do
  add=$(absolute "$add")
  if [[ -d $add ]]; then
    mkdir -p "$overlay$(dirname "$add")"
    cp -a "$add" "$overlay$(dirname "$add")/"
  else
    vm_copy_elf_with_libs "$overlay" "$add"
  fi
done

# Single quotes make every argument literal for the guest's sh; an embedded ' becomes '\''.
quote() { printf "'%s'" "${1//\'/\'\\\'\'}"; }
run_id=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
echo "$run_id" >"$overlay/ringlb-vm/run-id"
{
  echo "mkdir -p $(quote "$guest_cwd") && cd $(quote "$guest_cwd") || exit 125"
  for env in "${envs[@]}"; do
    echo "export $(quote "$env")"
  done
  printf 'exec %s' "$(quote "$command_path")"
  for arg in "$@"; do
    printf ' %s' "$(quote "$arg")"
  done
  echo
} >"$overlay/ringlb-vm/command"

# The kernel unpacks concatenated cpio archives in order, the overlay on top of the base.
initrd=$work/initrd.cpio
vm_pack_cpio "$overlay" "$work/overlay.cpio"
cat "$vm_dir/base.cpio" "$work/overlay.cpio" >"$initrd"

# The guest holds the initrd and its unpacked copy in RAM; leave room for the tests themselves.
initrd_mb=$(($(stat -c %s "$initrd") / 1048576 + 1))
if ((mem_mb < 2 * initrd_mb + 512)); then
  vm_log "raising --mem from $mem_mb to $((2 * initrd_mb + 512)) MB for a ${initrd_mb} MB initramfs"
  mem_mb=$((2 * initrd_mb + 512))
fi

# --- boot -------------------------------------------------------------------------------------
# q35 rather than microvm: microvm's guest sometimes hangs calibrating the TSC (no PIT/HPET
# reference). -nodefaults: no NIC, no VGA; the serial port is the only device the guest talks to.
# mitigations=off: page-table isolation makes every syscall flush the emulated TLB.
accel_args=(-accel tcg)
[[ $accel == kvm ]] && accel_args=(-accel kvm -cpu host)
log=$work/console.log
start=$SECONDS
set +e
timeout --kill-after=5 "$timeout_secs" qemu-system-x86_64 \
  -machine q35 "${accel_args[@]}" -smp "$cpus" -m "$mem_mb" \
  -nodefaults -no-user-config -display none -serial stdio -monitor none -no-reboot \
  -kernel "$kernel" -initrd "$initrd" \
  -append "console=ttyS0 quiet panic=-1 mitigations=off rdinit=/init" \
  </dev/null | tee "$log"
status=${PIPESTATUS[0]}
set -e
elapsed=$((SECONDS - start))

if ((status == 124 || status == 137)); then
  vm_log "timed out after ${timeout_secs}s running $command_path; qemu was killed"
  exit 124
fi
code=$(grep -aoE "RINGLB_VM_EXIT=[0-9]+ run=$run_id" "$log" | tail -n 1 | sed -E 's/^RINGLB_VM_EXIT=([0-9]+) .*/\1/' || true)
if [[ -z $code ]]; then
  vm_log "the guest ended without reporting an exit code (qemu status $status after ${elapsed}s); see the console output above"
  exit 125
fi
vm_log "$(basename "$command_path") exited with $code inside the VM (${elapsed}s including boot)"
exit "$code"
