#!/usr/bin/env bash
# Builds the appliance's Debian package from a ringlb binary:
#
#   cargo build --release -p ringlb && deploy/debian/build-deb.sh     # -> target/debian/ringlb_*.deb
#   deploy/debian/build-deb.sh --binary PATH --out DIR                # any build of ringlb
#
# The package holds /usr/bin/ringlb, /lib/systemd/system/ringlb.service (deploy/systemd/),
# /etc/ringlb/config.toml (a conffile), an empty /etc/ringlb/manifests/ and the docs and examples
# under /usr/share/doc/ringlb/; its postinst creates the `ringlb` system user. Prints the path of
# the .deb.
#
# Built with dpkg-deb, which every Debian system has, rather than cargo-deb: cargo-deb would cost
# CI a `cargo install` (minutes of compiling on two cores) and a release build of its own, while
# this script packs whichever binary it is given (the tests pack the one they already built), and
# the package is small enough to describe in one file. dpkg-shlibdeps (dpkg-dev) computes the
# library dependencies from the binary, as dh_shlibdeps would.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
binary=${CARGO_TARGET_DIR:-$repo/target}/release/ringlb
out=$repo/target/debian
while (($#)); do
  case $1 in
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--binary PATH] [--out DIR]" >&2; exit 2 ;;
  esac
done
[[ -x $binary ]] || { echo "$0: no ringlb binary at $binary (cargo build --release -p ringlb)" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n 1)
[[ -n $version ]] || { echo "$0: no workspace version in $repo/Cargo.toml" >&2; exit 1; }
arch=$(dpkg --print-architecture)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root

# Debug sections out (Debian's rule for packaged binaries), symbols kept so backtraces name functions.
install -D -m 0755 "$binary" "$root/usr/bin/ringlb"
strip --strip-debug "$root/usr/bin/ringlb"
install -D -m 0644 "$repo/deploy/systemd/ringlb.service" "$root/lib/systemd/system/ringlb.service"
install -D -m 0644 "$repo/deploy/debian/config.toml" "$root/etc/ringlb/config.toml"
install -d -m 0755 "$root/etc/ringlb/manifests"
doc=$root/usr/share/doc/ringlb
install -D -m 0644 "$repo/README.md" "$doc/README.md"
install -D -m 0644 "$repo/deploy/examples/web.yaml" "$doc/examples/web.yaml"
install -D -m 0644 "$repo/deploy/systemd/ringlb-l2.conf" "$doc/examples/ringlb-l2.conf"
cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: ringlb

Files: *
Copyright: the ringlb developers
License: Apache-2.0
 On Debian systems the full text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
EOF

# dpkg-shlibdeps reads the package's name from a debian/control of its working directory.
mkdir -p "$stage/shlibs/debian"
printf 'Source: ringlb\n\nPackage: ringlb\nArchitecture: any\n' >"$stage/shlibs/debian/control"
library_depends=$(cd "$stage/shlibs" && dpkg-shlibdeps -O "$root/usr/bin/ringlb" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[[ -n $library_depends ]] || { echo "$0: dpkg-shlibdeps found no library dependencies" >&2; exit 1; }

mkdir -p "$root/DEBIAN"
cat >"$root/DEBIAN/control" <<EOF
Package: ringlb
Version: $version
Architecture: $arch
Maintainer: ringlb developers <maintainers@users.noreply.invalid>
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Depends: $library_depends, adduser
Recommends: systemd
Section: net
Priority: optional
Description: thread-per-core io_uring L4 load balancer for Kubernetes Services
 ringlb balances TCP, UDP and SCTP connections to the endpoints of Kubernetes
 Services of type LoadBalancer and Services with external IPs, watched through
 the API of a cluster or read from manifest files. This package runs it as an
 edge appliance: ringlb.service serves the manifests in /etc/ringlb/manifests
 with the flags of /etc/ringlb/config.toml, as the unprivileged user ringlb.
EOF
echo /etc/ringlb/config.toml >"$root/DEBIAN/conffiles"
install -m 0755 "$repo/deploy/debian/postinst" "$repo/deploy/debian/prerm" "$repo/deploy/debian/postrm" "$root/DEBIAN/"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum >DEBIAN/md5sums)

mkdir -p "$out"
deb=$out/ringlb_${version}_${arch}.deb
# gzip: fast to build and readable by every dpkg; owner root for every file whoever builds.
dpkg-deb --root-owner-group -Zgzip --build "$root" "$deb" >/dev/null
echo "$deb"
