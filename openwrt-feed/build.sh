#!/bin/sh
# build.sh VERSION OUTDIR TARGET...
#
# For each target name of targets.txt (x86_64, aarch64, armv7, arm, mips,
# mipsel; "all" for every one), packages the static release binary
# target/<rust triple>/release/ctrl-exec (built by `make cross`) once per
# OpenWrt architecture listed for it, into OUTDIR/<arch>/ (one feed
# directory per architecture; index them with mkfeed.sh). Older versions of
# the package in those directories are removed. CARGO_TARGET_DIR is honoured.
set -eu

usage() {
	echo "usage: $0 VERSION OUTDIR TARGET... (targets: $(names | tr '\n' ' ')or all)" >&2
	exit 2
}
die() {
	echo "build: $*" >&2
	exit 1
}

here=$(cd "$(dirname "$0")" && pwd)
table="$here/targets.txt"
names() { awk '!/^#/ && NF >= 3 { print $1 }' "$table"; }

[ $# -ge 3 ] || usage
version=$1
outdir=$2
shift 2
if [ "$*" = all ]; then
	# shellcheck disable=SC2046 # target names are single words
	set -- $(names)
fi
tdir=${CARGO_TARGET_DIR:-$(cd "$here/.." && pwd)/target}

# Check every target before packaging any.
for name in "$@"; do
	line=$(awk -v n="$name" '!/^#/ && $1 == n && NF >= 3' "$table")
	[ -n "$line" ] || die "unknown target '$name' (known: $(names | tr '\n' ' '))"
	triple=$(echo "$line" | awk '{ print $2 }')
	[ -f "$tdir/$triple/release/ctrl-exec" ] ||
		die "$tdir/$triple/release/ctrl-exec is missing: run make cross first (it builds $name as $triple)"
done

for name in "$@"; do
	line=$(awk -v n="$name" '!/^#/ && $1 == n' "$table")
	triple=$(echo "$line" | awk '{ print $2 }')
	bin="$tdir/$triple/release/ctrl-exec"
	for arch in $(echo "$line" | awk '{ for (i = 3; i <= NF; i++) print $i }'); do
		for old in "$outdir/$arch"/ctrl-exec_*_"$arch".ipk; do
			[ -f "$old" ] || continue
			[ "$old" = "$outdir/$arch/ctrl-exec_${version}_$arch.ipk" ] && continue
			echo "build: removing $old (older version)" >&2
			rm -f "$old"
		done
		"$here/mkipk.sh" "$bin" "$arch" "$version" "$outdir/$arch"
	done
done
