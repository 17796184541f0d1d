#!/usr/bin/python3
"""Runs a command under an OCI/Kubernetes seccomp profile, the way a container runtime would.

    seccomp-exec.py PROFILE -- CMD ARGS...

Loads PROFILE (the JSON of a Kubernetes `Localhost` profile) into libseccomp: the profile's default
action, its architectures and its rules; sets no_new_privs (as Kubernetes does with
`allowPrivilegeEscalation: false`), loads the filter and execs CMD, so CMD and everything it starts
run under the filter from their first instruction.

Rule names libseccomp does not know (newer than this libseccomp) are skipped with a note on stderr,
as runc and crun do. Anything the profile says that this script does not implement (an unknown
action, key, architecture or argument operator) is an error: a wrapper that ignored part of a
profile could make a test pass under a filter more permissive than the one a cluster would load.

Needs Debian's `python3-seccomp` (libseccomp's Python binding) for the interpreter on the first line.
"""

import json
import os
import shutil
import sys

try:
    import seccomp
except ImportError:
    sys.exit(
        "seccomp-exec.py: libseccomp's Python binding is missing; install it with "
        "`apt-get install python3-seccomp` (Debian's /usr/bin/python3)"
    )

ARCHITECTURES = {
    "SCMP_ARCH_X86_64": seccomp.Arch.X86_64,
    "SCMP_ARCH_X86": seccomp.Arch.X86,
    "SCMP_ARCH_X32": seccomp.Arch.X32,
    "SCMP_ARCH_AARCH64": seccomp.Arch.AARCH64,
    "SCMP_ARCH_ARM": seccomp.Arch.ARM,
    "SCMP_ARCH_RISCV64": seccomp.Arch.RISCV64,
    "SCMP_ARCH_PPC64LE": seccomp.Arch.PPC64LE,
    "SCMP_ARCH_S390X": seccomp.Arch.S390X,
}

OPERATORS = {
    "SCMP_CMP_NE": seccomp.NE,
    "SCMP_CMP_LT": seccomp.LT,
    "SCMP_CMP_LE": seccomp.LE,
    "SCMP_CMP_EQ": seccomp.EQ,
    "SCMP_CMP_GE": seccomp.GE,
    "SCMP_CMP_GT": seccomp.GT,
    "SCMP_CMP_MASKED_EQ": seccomp.MASKED_EQ,
}

PROFILE_KEYS = {"defaultAction", "defaultErrnoRet", "architectures", "syscalls", "flags"}
RULE_KEYS = {"names", "action", "errnoRet", "args", "comment"}
ARG_KEYS = {"index", "value", "valueTwo", "op"}


class ProfileError(Exception):
    pass


def action(name, errno_ret, where):
    """The libseccomp action for an OCI action name; `errno_ret` for SCMP_ACT_ERRNO/TRACE."""
    if name == "SCMP_ACT_ERRNO":
        return seccomp.ERRNO(1 if errno_ret is None else errno_ret)  # EPERM, as runc defaults
    if name == "SCMP_ACT_TRACE":
        return seccomp.TRACE(0 if errno_ret is None else errno_ret)
    simple = {
        "SCMP_ACT_ALLOW": seccomp.ALLOW,
        "SCMP_ACT_KILL": seccomp.KILL,
        "SCMP_ACT_KILL_THREAD": seccomp.KILL,
        "SCMP_ACT_KILL_PROCESS": seccomp.KILL_PROCESS,
        "SCMP_ACT_TRAP": seccomp.TRAP,
        "SCMP_ACT_LOG": seccomp.LOG,
    }
    if name not in simple:
        raise ProfileError(f"{where}: unknown action {name!r}")
    return simple[name]


def unknown_keys(mapping, known, where):
    extra = set(mapping) - known
    if extra:
        raise ProfileError(f"{where}: keys this wrapper does not implement: {sorted(extra)}")


def arguments(rule, where):
    conditions = []
    for arg in rule.get("args") or []:
        unknown_keys(arg, ARG_KEYS, where)
        if arg.get("op") not in OPERATORS:
            raise ProfileError(f"{where}: unknown argument operator {arg.get('op')!r}")
        # For MASKED_EQ, OCI's `value` is the mask and `valueTwo` the datum, as libseccomp takes them.
        conditions.append(seccomp.Arg(arg["index"], OPERATORS[arg["op"]], arg["value"], arg.get("valueTwo", 0)))
    return conditions


def build_filter(profile):
    """A libseccomp filter equivalent to `profile`, and the rule names skipped as unknown."""
    unknown_keys(profile, PROFILE_KEYS, "profile")
    if profile.get("flags"):
        raise ProfileError(f"profile: flags are not implemented: {profile['flags']}")
    if "defaultAction" not in profile:
        raise ProfileError("profile: no defaultAction")
    default = action(profile["defaultAction"], profile.get("defaultErrnoRet"), "defaultAction")
    syscall_filter = seccomp.SyscallFilter(defaction=default)
    for name in profile.get("architectures") or []:
        if name not in ARCHITECTURES:
            raise ProfileError(f"architectures: unknown architecture {name!r}")
        arch = ARCHITECTURES[name]
        if not syscall_filter.exist_arch(arch):  # the native one is there from the start
            syscall_filter.add_arch(arch)
    skipped = []
    for number, rule in enumerate(profile.get("syscalls") or []):
        where = f"syscalls[{number}]"
        unknown_keys(rule, RULE_KEYS, where)
        rule_action = action(rule.get("action"), rule.get("errnoRet"), where)
        conditions = arguments(rule, where)
        for name in rule.get("names") or []:
            # -1 (__NR_SCMP_ERROR): a name libseccomp does not know on any architecture.
            if seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) == -1:
                skipped.append(name)
                continue
            syscall_filter.add_rule(rule_action, name, *conditions)
    return syscall_filter, skipped


def main(argv):
    if len(argv) < 4 or argv[2] != "--":
        sys.exit("usage: seccomp-exec.py PROFILE -- CMD ARGS...")
    profile_path, command = argv[1], argv[3:]
    # PATH is searched now, before the filter, so the search needs nothing from the profile.
    program = shutil.which(command[0]) or command[0]
    try:
        with open(profile_path, encoding="utf-8") as file:
            profile = json.load(file)
        syscall_filter, skipped = build_filter(profile)
    except (OSError, ValueError, ProfileError) as error:
        sys.exit(f"seccomp-exec.py: {profile_path}: {error}")
    if skipped:
        print(f"seccomp-exec.py: names unknown to libseccomp, skipped: {' '.join(skipped)}", file=sys.stderr)
    syscall_filter.set_attr(seccomp.Attr.CTL_NNP, 1)  # no_new_privs, set by load()
    sys.stderr.flush()
    syscall_filter.load()
    # From here on only what the profile allows; execve must be among it.
    try:
        os.execv(program, command)
    except OSError as error:
        sys.exit(f"seccomp-exec.py: exec {command[0]}: {error}")


if __name__ == "__main__":
    main(sys.argv)
