#!/bin/sh
# mkfeed.sh FEEDDIR [SECRET_KEY]
#
# Writes the opkg index of one feed directory (one OpenWrt architecture, e.g.
# openwrt-feed/out/mips_24kc), as OpenWrt's package/Makefile does:
#   Packages      the control stanza of every .ipk (sorted by path), with
#                 Filename, Size and SHA256sum inserted before Description,
#                 stanzas separated by a blank line;
#   Packages.gz   gzip -9n of Packages (what opkg downloads);
#   Packages.sig  with SECRET_KEY: an Ed25519 signature of the *uncompressed*
#                 Packages, made with signify-openbsd, which writes the same
#                 format as OpenWrt's usign (opkg-key verify checks it).
# Without SECRET_KEY an old Packages.sig is removed, since it could not match.
#
# Key handling: see docs/openwrt.md ("Signing the feed"). The secret key
# never goes into the feed directory; give it as a path or via FEED_KEY in
# `make feed`.
set -eu

usage() {
	echo "usage: $0 FEEDDIR [SECRET_KEY]" >&2
	exit 2
}
die() {
	echo "mkfeed: $*" >&2
	exit 1
}

case $# in 1 | 2) ;; *) usage ;; esac
feed=$1
key=${2:-}
[ -d "$feed" ] || die "no directory $feed"
export LC_ALL=C
if [ -n "$key" ]; then
	[ -r "$key" ] || die "cannot read the secret key $key"
	key=$(cd "$(dirname "$key")" && pwd)/$(basename "$key")
	command -v signify-openbsd >/dev/null || die "signify-openbsd is not installed (Debian: apt-get install signify-openbsd)"
fi

cd "$feed"
ipks=$(find . -maxdepth 1 -name '*.ipk' -type f | sed 's|^\./||' | sort)
if [ -z "$ipks" ]; then
	if find . -mindepth 2 -name '*.ipk' -type f | grep -q .; then
		die "$feed holds no .ipk itself; give one architecture directory (one feed per arch), e.g. $feed/$(find . -mindepth 2 -name '*.ipk' | head -n 1 | cut -d/ -f2)"
	fi
	die "no .ipk files in $feed"
fi
if printf '%s\n' "$ipks" | grep -q '[^A-Za-z0-9._+~-]'; then
	die "unusable .ipk file name in $feed: $(printf '%s\n' "$ipks" | grep '[^A-Za-z0-9._+~-]' | head -n 1)"
fi

tmp="Packages.tmp.$$"
trap 'rm -f "$tmp"' EXIT INT TERM
: >"$tmp"
for f in $ipks; do
	ctl=$(tar -xzOf "$f" ./control.tar.gz | tar -xzOf - ./control) ||
		die "$f: no ./control in ./control.tar.gz (not an OpenWrt .ipk?)"
	printf '%s\n' "$ctl" | grep -q '^Description:' || die "$f: control file has no Description field"
	size=$(wc -c <"$f" | tr -d ' ')
	sum=$(sha256sum "$f" | cut -d' ' -f1)
	printf '%s\n' "$ctl" | awk -v fn="$f" -v size="$size" -v sum="$sum" '
		/^Description:/ && !done {
			print "Filename: " fn; print "Size: " size; print "SHA256sum: " sum; done = 1
		}
		{ print }' >>"$tmp"
	echo >>"$tmp"
done

# OpenWrt's work-around for a SHA-512 bug in old usign builds that are still
# on devices: some index sizes make their signature check fail, so pad those.
case $(((64 + $(wc -c <"$tmp")) % 128)) in
110 | 111) printf '\n\n' >>"$tmp" ;;
esac

mv -f "$tmp" Packages
gzip -9nc Packages >Packages.gz
if [ -n "$key" ]; then
	rm -f Packages.sig
	signify-openbsd -S -s "$key" -m Packages -x Packages.sig ||
		die "signing failed (a passphrase-protected key needs a terminal)"
	echo "$feed: $(echo "$ipks" | wc -l | tr -d ' ') package(s), Packages signed"
else
	rm -f Packages.sig
	echo "$feed: $(echo "$ipks" | wc -l | tr -d ' ') package(s), Packages NOT signed (no key given)"
fi
