#!/bin/sh
# check.sh FEEDDIR [PUBKEY]
#
# Verifies one feed directory (one OpenWrt architecture) as built by
# mkipk.sh and mkfeed.sh, with tar, gzip, sha256sum, od and awk only (opkg is
# not available on a build host):
#   every .ipk: outer members exactly ./debian-binary ("2.0"),
#     ./data.tar.gz, ./control.tar.gz in this order; control fields present,
#     Package/Version/Architecture agreeing with the file name and the
#     directory; Installed-Size = size of the uncompressed data tar; the
#     exact list of files with their modes, owner 0/0 and the role symlinks;
#     conffiles present; maintainer scripts executable; the init script
#     parses (sh -n); the binary is a static ELF for this architecture;
#   the index: one Packages stanza per .ipk, each equal to the package's
#     control file plus Filename, Size and SHA256sum that match the file;
#     Packages.gz decompresses to Packages; the size avoids the usign bug;
#   with PUBKEY: Packages.sig is a valid signature of Packages
#     (signify-openbsd -V, the format usign and opkg-key use).
# Stops at the first problem with a message and exit status 1; prints one
# line per package and a summary when everything holds.
# shellcheck disable=SC2015 # "a && b || fail ..." is meant: fail exits
set -eu

fail() {
	echo "check: FAIL: $*" >&2
	exit 1
}

case $# in 1 | 2) ;; *)
	echo "usage: $0 FEEDDIR [PUBKEY]" >&2
	exit 2
	;;
esac
feed=$1
pub=${2:-}
[ -d "$feed" ] || fail "no directory $feed"
if [ -n "$pub" ]; then
	[ -r "$pub" ] || fail "cannot read the public key $pub"
	pub=$(cd "$(dirname "$pub")" && pwd)/$(basename "$pub")
	command -v signify-openbsd >/dev/null || fail "signify-openbsd is not installed"
fi
export LC_ALL=C
work=$(mktemp -d "${TMPDIR:-/tmp}/ipkcheck.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
cd "$feed"
dirarch=$(basename "$(pwd)")

ipks=$(find . -maxdepth 1 -name '*.ipk' -type f | sed 's|^\./||' | sort)
if [ -z "$ipks" ]; then
	find . -mindepth 2 -name '*.ipk' -type f | grep -q . &&
		fail "$feed holds no .ipk itself; give one architecture directory (one feed per arch)"
	fail "no .ipk files in $feed"
fi
if printf '%s\n' "$ipks" | grep -q '[^A-Za-z0-9._+~-]'; then
	fail "unusable file name: $(printf '%s\n' "$ipks" | grep '[^A-Za-z0-9._+~-]' | head -n 1)"
fi

# field NAME FILE: value of a control field (first line only).
field() {
	sed -n "s/^$1: *//p" "$2" | head -n 1
}

# elf_info FILE: "<class> <data> <machine> <static|dynamic>" from the ELF
# header and program headers (static = no PT_INTERP).
elf_info() {
	od -An -v -tu1 -N 65536 "$1" | awk '
		{ for (i = 1; i <= NF; i++) b[n++] = $i }
		function u(off, len,   v, k) {
			v = 0
			if (le) for (k = len - 1; k >= 0; k--) v = v * 256 + b[off + k]
			else for (k = 0; k < len; k++) v = v * 256 + b[off + k]
			return v
		}
		END {
			if (n < 52 || b[0] != 127 || b[1] != 69 || b[2] != 76 || b[3] != 70) { print "not-elf"; exit }
			cls = b[4]; le = (b[5] == 1)
			mach = u(18, 2)
			if (cls == 2) { phoff = u(32, 8); phent = u(54, 2); phnum = u(56, 2) }
			else { phoff = u(28, 4); phent = u(42, 2); phnum = u(44, 2) }
			interp = 0
			for (i = 0; i < phnum; i++) {
				o = phoff + i * phent
				if (o + 4 > n) { print "truncated"; exit }
				if (u(o, 4) == 3) interp = 1
			}
			print cls, b[5], mach, (interp ? "dynamic" : "static")
		}'
}

# Expected data members: mode owner path [-> target].
cat >"$work/expect" <<'EOF'
drwxr-xr-x 0/0 ./
drwxr-xr-x 0/0 ./etc/
drwxr-xr-x 0/0 ./etc/config/
-rw------- 0/0 ./etc/config/ctrl-exec
drwxr-x--- 0/0 ./etc/ctrl-exec-agent/
-rw-r----- 0/0 ./etc/ctrl-exec-agent/scripts.conf
drwxr-xr-x 0/0 ./etc/init.d/
-rwxr-xr-x 0/0 ./etc/init.d/ctrl-exec-agent
drwxr-xr-x 0/0 ./lib/
drwxr-xr-x 0/0 ./lib/upgrade/
drwxr-xr-x 0/0 ./lib/upgrade/keep.d/
-rw-r--r-- 0/0 ./lib/upgrade/keep.d/ctrl-exec
drwxr-xr-x 0/0 ./usr/
drwxr-xr-x 0/0 ./usr/sbin/
-rwxr-xr-x 0/0 ./usr/sbin/ctrl-exec
lrwxrwxrwx 0/0 ./usr/sbin/ctrl-exec-agent -> ctrl-exec
lrwxrwxrwx 0/0 ./usr/sbin/ctrl-exec-ca -> ctrl-exec
lrwxrwxrwx 0/0 ./usr/sbin/ctrl-exec-server -> ctrl-exec
EOF

count=0
for f in $ipks; do
	count=$((count + 1))
	p="$work/$count"
	mkdir -p "$p/data" "$p/control"

	# File name: <package>_<version>_<arch>.ipk (version has no '_').
	base=${f%.ipk}
	npkg=${base%%_*}
	rest=${base#*_}
	nver=${rest%%_*}
	narch=${rest#*_}
	[ "$npkg" != "$base" ] && [ "$nver" != "$rest" ] ||
		fail "$f: name is not <package>_<version>_<arch>.ipk"

	# Outer archive.
	members=$(tar -tzf "$f" 2>/dev/null) || fail "$f: not a gzip'd tar archive (damaged?)"
	[ "$members" = "./debian-binary
./data.tar.gz
./control.tar.gz" ] || fail "$f: outer members are not exactly ./debian-binary ./data.tar.gz ./control.tar.gz in this order: $(echo "$members" | tr '\n' ' ')"
	tar -xzf "$f" -C "$p" || fail "$f: cannot unpack"
	printf '2.0\n' | cmp -s - "$p/debian-binary" || fail "$f: debian-binary is not '2.0'"
	tar -xzf "$p/control.tar.gz" -C "$p/control" 2>/dev/null || fail "$f: control.tar.gz does not unpack"
	tar -xzf "$p/data.tar.gz" -C "$p/data" 2>/dev/null || fail "$f: data.tar.gz does not unpack"

	# Control file.
	c="$p/control/control"
	[ -f "$c" ] || fail "$f: no ./control in control.tar.gz"
	for k in Package Version Architecture Installed-Size Maintainer License Section Description; do
		[ -n "$(field "$k" "$c")" ] || fail "$f: control field $k missing or empty"
	done
	pkg=$(field Package "$c")
	ver=$(field Version "$c")
	arch=$(field Architecture "$c")
	[ "$pkg" = ctrl-exec ] || fail "$f: Package is '$pkg', expected ctrl-exec"
	[ "$pkg" = "$npkg" ] || fail "$f: Package '$pkg' does not match the file name"
	[ "$ver" = "$nver" ] || fail "$f: Version '$ver' does not match the file name"
	[ "$arch" = "$narch" ] || fail "$f: Architecture '$arch' does not match the file name"
	[ "$arch" = "$dirarch" ] || fail "$f: Architecture '$arch' does not match the feed directory '$dirarch' (one feed per architecture)"
	[ "$(field License "$c")" = AGPL-3.0-only ] || fail "$f: License is not AGPL-3.0-only"
	isize=$(field Installed-Size "$c")
	real=$(gzip -dc "$p/data.tar.gz" | wc -c | tr -d ' ')
	[ "$isize" = "$real" ] || fail "$f: Installed-Size $isize, but the data tar is $real bytes"

	# Maintainer scripts and conffiles.
	for s in postinst postinst-pkg prerm; do
		[ -f "$p/control/$s" ] && [ -x "$p/control/$s" ] || fail "$f: control.tar.gz lacks an executable $s"
		sh -n "$p/control/$s" || fail "$f: $s does not parse"
	done
	[ -f "$p/control/conffiles" ] || fail "$f: no conffiles"
	while IFS= read -r cf; do
		[ -n "$cf" ] || continue
		[ -f "$p/data$cf" ] || fail "$f: conffile $cf is not in the package"
	done <"$p/control/conffiles"
	grep -qx /etc/config/ctrl-exec "$p/control/conffiles" || fail "$f: /etc/config/ctrl-exec is not a conffile"

	# Data: exact members, modes, owners, links.
	tar --numeric-owner -tvzf "$p/data.tar.gz" |
		awk '{ l = $1 " " $2 " " $6; if ($7 == "->") l = l " -> " $8; print l }' >"$p/list"
	if ! cmp -s "$work/expect" "$p/list"; then
		fail "$f: data members differ from what is expected (- expected, + found):
$(diff "$work/expect" "$p/list" | grep '^[<>]' | sed 's/^</-/; s/^>/+/')"
	fi
	init="$p/data/etc/init.d/ctrl-exec-agent"
	sh -n "$init" || fail "$f: the init script does not parse"
	grep -q '^USE_PROCD=1' "$init" && grep -q '^start_service()' "$init" ||
		fail "$f: the init script is not a procd script"

	# The binary: static ELF for this architecture.
	case "$arch" in
	x86_64) want="2 1 62" ;;
	aarch64_*) want="2 1 183" ;;
	arm_*) want="1 1 40" ;;
	mips_*) want="1 2 8" ;;
	mipsel_*) want="1 1 8" ;;
	*) fail "$f: no ELF expectation for architecture '$arch' (add it to check.sh)" ;;
	esac
	info=$(elf_info "$p/data/usr/sbin/ctrl-exec")
	case "$info" in
	"$want static") ;;
	"$want dynamic") fail "$f: /usr/sbin/ctrl-exec is dynamically linked; the package declares no dependencies" ;;
	*) fail "$f: /usr/sbin/ctrl-exec is not an ELF binary for $arch (class data machine = '$info', expected '$want')" ;;
	esac

	size=$(wc -c <"$f" | tr -d ' ')
	sum=$(sha256sum "$f" | cut -d' ' -f1)
	echo "$f $size $sum" >>"$work/files"
	cp "$c" "$work/control.$f"
	echo "ok  $pkg $ver $arch: .ipk $size bytes, installed $isize bytes, static ELF, sha256 $sum" >>"$work/report"
done

# The index.
[ -f Packages ] || fail "no Packages index in $feed (run mkfeed.sh)"
[ -f Packages.gz ] || fail "no Packages.gz in $feed"
gzip -dc Packages.gz 2>/dev/null | cmp -s - Packages || fail "Packages.gz does not decompress to Packages"
case $(((64 + $(wc -c <Packages)) % 128)) in
110 | 111) fail "Packages has a size that old usign builds cannot verify (mkfeed.sh pads it)" ;;
esac
awk -v dir="$work" '
	BEGIN { RS = ""; FS = "\n" }
	{
		fn = ""; st = ""
		for (i = 1; i <= NF; i++) {
			if ($i ~ /^Filename: /) { fn = substr($i, 11); continue }
			if ($i ~ /^(Size|SHA256sum): /) { continue }
			st = st $i "\n"
		}
		if (fn == "") { print "stanza " NR " has no Filename" > "/dev/stderr"; exit 1 }
		if (fn in seen) { print fn " is listed twice" > "/dev/stderr"; exit 1 }
		seen[fn] = 1
		printf "%s", st > (dir "/stanza." fn)
		close(dir "/stanza." fn)
		print fn, size(), sha()
	}
	function size(   i) { for (i = 1; i <= NF; i++) if ($i ~ /^Size: /) return substr($i, 7); return "-" }
	function sha(   i) { for (i = 1; i <= NF; i++) if ($i ~ /^SHA256sum: /) return substr($i, 12); return "-" }
' Packages >"$work/index" 2>"$work/index.err" || fail "Packages: $(cat "$work/index.err")"
while read -r fn size sum; do
	case "$fn" in */* | "") fail "Packages lists '$fn', which is not a file of this directory" ;; esac
	line=$(awk -v fn="$fn" '$1 == fn' "$work/files")
	[ -n "$line" ] || fail "Packages lists $fn, which is not in $feed"
	# shellcheck disable=SC2086 # three words: name, size, sum
	set -- $line
	[ "$size" = "$2" ] || fail "Packages: Size of $fn is $size, the file has $2 bytes"
	[ "$sum" = "$3" ] || fail "Packages: SHA256sum of $fn does not match the file (altered .ipk or stale index)"
	cmp -s "$work/stanza.$fn" "$work/control.$fn" ||
		fail "Packages: the stanza of $fn differs from the package's control file (stale index)"
done <"$work/index"
while read -r fn _ _; do
	[ -n "$(awk -v fn="$fn" '$1 == fn' "$work/index")" ] ||
		fail "$fn is not listed in Packages (run mkfeed.sh)"
done <"$work/files"

# The signature.
if [ -n "$pub" ]; then
	[ -f Packages.sig ] || fail "no Packages.sig (feed not signed)"
	signify-openbsd -V -q -p "$pub" -m Packages -x Packages.sig 2>"$work/sig.err" ||
		fail "Packages.sig does not verify with $pub: $(cat "$work/sig.err")"
	sigline="index signed, signature verified with $(basename "$pub")"
else
	sigline="signature NOT checked (no PUBKEY given)"
fi

cat "$work/report"
echo "feed $feed ($dirarch): $count package(s) ok, Packages and Packages.gz match, $sigline"
