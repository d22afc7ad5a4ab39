#!/bin/sh
# mkipk.sh BINARY OPENWRT_ARCH VERSION OUTDIR
#
# Builds OUTDIR/ctrl-exec_<VERSION>_<OPENWRT_ARCH>.ipk from a static
# ctrl-exec binary without the OpenWrt SDK, the way OpenWrt's
# scripts/ipkg-build does: a gzip'd GNU tar holding ./debian-binary ("2.0"),
# ./data.tar.gz and ./control.tar.gz, in that order (opkg on OpenWrt reads only
# this form, not the Debian-style ar archive).
#
# Reproducible: every member gets owner 0:0 and mtime $SOURCE_DATE_EPOCH
# (default: the time of the last git commit), names are sorted, gzip stores
# no name or time. The same inputs give a byte-identical .ipk.
#
# Environment: SOURCE_DATE_EPOCH; IPK_MAINTAINER (the Maintainer field).
set -eu

usage() {
	echo "usage: $0 BINARY OPENWRT_ARCH VERSION OUTDIR" >&2
	exit 2
}
die() {
	echo "mkipk: $*" >&2
	exit 1
}

here=$(cd "$(dirname "$0")" && pwd)
files="$here/files"
for f in ctrl-exec-agent.init ctrl-exec.config; do
	[ -f "$files/$f" ] || die "missing $files/$f"
done
export LC_ALL=C
umask 022

# stage BINARY DEST: the installed files, with their modes, under DEST.
stage() {
	bin=$1
	dest=$2
	mkdir -p "$dest/usr/sbin" "$dest/etc/init.d" "$dest/etc/config" \
		"$dest/etc/ctrl-exec-agent" "$dest/lib/upgrade/keep.d"
	cp "$bin" "$dest/usr/sbin/ctrl-exec"
	chmod 0755 "$dest/usr/sbin/ctrl-exec"
	# Role links, relative so they also resolve inside an image root.
	for role in ctrl-exec-agent ctrl-exec-ca ctrl-exec-server; do
		ln -sf ctrl-exec "$dest/usr/sbin/$role"
	done
	cp "$files/ctrl-exec-agent.init" "$dest/etc/init.d/ctrl-exec-agent"
	chmod 0755 "$dest/etc/init.d/ctrl-exec-agent"
	cp "$files/ctrl-exec.config" "$dest/etc/config/ctrl-exec"
	chmod 0600 "$dest/etc/config/ctrl-exec"

	# The identity directory. Only the allowlist template comes with the
	# package (install-bundle keeps an existing scripts.conf); key,
	# certificates and trust files are the router's own, never packaged.
	chmod 0750 "$dest/etc/ctrl-exec-agent"
	cat >"$dest/etc/ctrl-exec-agent/scripts.conf" <<'EOF'
# ctrl-exec allowlist: the only scripts dispatchers may run on this router.
#   <name> = <absolute path> [timeout=<seconds>]
# <name>: letters, digits, '_' and '-'. The path is executed directly (no
# shell, no PATH search), so it must be executable: a binary or a script
# with a '#!' line. Arguments arrive as argv, exactly as sent. Comments only
# on lines of their own. Apply changes: /etc/init.d/ctrl-exec-agent reload
#
# Keep scripts on flash, e.g. in /etc/ctrl-exec-agent/scripts/ (backed up
# and kept over sysupgrade with the rest of this directory). Example:
#uptime = /usr/bin/uptime timeout=10
#wifi-status = /etc/ctrl-exec-agent/scripts/wifi-status.sh timeout=30
EOF
	chmod 0640 "$dest/etc/ctrl-exec-agent/scripts.conf"

	# sysupgrade keeps changed conffiles, but not files the package does not
	# ship (key, certificates, trust map, scripts): keep the whole directory
	# so that a firmware upgrade does not unpair the router.
	echo /etc/ctrl-exec-agent/ >"$dest/lib/upgrade/keep.d/ctrl-exec"
	chmod 0644 "$dest/lib/upgrade/keep.d/ctrl-exec"

	find "$dest" -type d ! -path "$dest/etc/ctrl-exec-agent" -exec chmod 0755 {} +
}

if [ "${1:-}" = --stage ]; then
	[ $# -eq 3 ] || usage
	[ -f "$2" ] || die "no binary at $2"
	mkdir -p "$3"
	stage "$2" "$3"
	exit 0
fi

[ $# -eq 4 ] || usage
bin=$1
arch=$2
version=$3
outdir=$4

[ -f "$bin" ] || die "no binary at $bin"
case "$arch" in
"" | *[!a-z0-9_-]*) die "invalid OpenWrt architecture '$arch'" ;;
esac
# '_' separates the fields of the file name, so it cannot be in the version.
case "$version" in
[0-9]*) ;;
*) die "invalid version '$version' (must start with a digit)" ;;
esac
case "$version" in
*[!A-Za-z0-9.+~-]*) die "invalid version '$version' (allowed: letters, digits, . + ~ -)" ;;
esac
tar --version 2>/dev/null | grep -q 'GNU tar' || die "GNU tar is required"

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git -C "$here" log -1 --format=%ct 2>/dev/null || true)
	if [ -z "$SOURCE_DATE_EPOCH" ]; then
		SOURCE_DATE_EPOCH=$(date +%s)
		echo "mkipk: SOURCE_DATE_EPOCH unset and no git history: using the current time (not reproducible)" >&2
	fi
fi
case "$SOURCE_DATE_EPOCH" in
"" | *[!0-9]*) die "SOURCE_DATE_EPOCH must be a number of seconds, not '$SOURCE_DATE_EPOCH'" ;;
esac
maintainer=${IPK_MAINTAINER:-ctrl-exec developers}

work=$(mktemp -d "${TMPDIR:-/tmp}/mkipk.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
data="$work/data"
ctl="$work/control"
mkdir -p "$data" "$ctl"

# --- data: what lands on the router -------------------------------------
stage "$bin" "$data"

TAR="tar --format=gnu --numeric-owner --owner=0 --group=0 --sort=name --mtime=@$SOURCE_DATE_EPOCH"
(cd "$data" && $TAR -cf - .) | gzip -9n >"$work/data.tar.gz"
isize=$(gzip -dc "$work/data.tar.gz" | wc -c | tr -d ' ')

# --- control -------------------------------------------------------------
cat >"$ctl/control" <<EOF
Package: ctrl-exec
Version: $version
License: AGPL-3.0-only
Section: net
Require-User: ctrl-exec-agent:ctrl-exec-agent
SourceDateEpoch: $SOURCE_DATE_EPOCH
Maintainer: $maintainer
Architecture: $arch
Installed-Size: $isize
Description: Run named, allowlisted scripts on remote hosts over mutual TLS.
 One static binary with three roles: the agent (ctrl-exec-agent, run by
 /etc/init.d/ctrl-exec-agent once paired and enabled in /etc/config/ctrl-exec),
 the operator CLI (ctrl-exec) and the CA tools (ctrl-exec-ca).
EOF
printf '%s\n' /etc/config/ctrl-exec /etc/ctrl-exec-agent/scripts.conf >"$ctl/conffiles"

# Maintainer scripts as OpenWrt generates them: with IPKG_INSTROOT set (an
# image being built) they only touch files under that root and never start
# anything; on a live system default_postinst creates the Require-User user,
# enables and starts the init script (which does nothing until the agent is
# paired and enabled), and default_prerm stops and disables it.
cat >"$ctl/postinst" <<'EOF'
#!/bin/sh
[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0
[ -s "${IPKG_INSTROOT}/lib/functions.sh" ] || exit 0
. "${IPKG_INSTROOT}/lib/functions.sh"
default_postinst $0 $@
EOF
# Sourced by default_postinst (after the user exists, before the init
# script is enabled and started).
cat >"$ctl/postinst-pkg" <<'EOF'
#!/bin/sh
[ -n "${IPKG_INSTROOT}" ] && exit 0
if ! /usr/sbin/ctrl-exec-agent paired >/dev/null 2>&1; then
	echo "ctrl-exec: this router is not paired yet. On the dispatcher:"
	echo "  ctrl-exec-ca enroll <name> --ip <router address> --bundle > bundle.txt"
	echo "then here: ctrl-exec-agent install-bundle --dir /etc/ctrl-exec-agent < bundle.txt"
	echo "and: uci set ctrl-exec.agent.enabled=1; uci commit ctrl-exec; /etc/init.d/ctrl-exec-agent start"
fi
exit 0
EOF
cat >"$ctl/prerm" <<'EOF'
#!/bin/sh
[ -s "${IPKG_INSTROOT}/lib/functions.sh" ] || exit 0
. "${IPKG_INSTROOT}/lib/functions.sh"
default_prerm $0 $@
EOF
chmod 0644 "$ctl/control" "$ctl/conffiles"
chmod 0755 "$ctl/postinst" "$ctl/postinst-pkg" "$ctl/prerm"
(cd "$ctl" && $TAR -cf - .) | gzip -9n >"$work/control.tar.gz"

# --- the package ---------------------------------------------------------
echo 2.0 >"$work/debian-binary"
chmod 0644 "$work/debian-binary" "$work/data.tar.gz" "$work/control.tar.gz"
mkdir -p "$outdir"
out="$outdir/ctrl-exec_${version}_${arch}.ipk"
(cd "$work" && $TAR -cf - ./debian-binary ./data.tar.gz ./control.tar.gz) |
	gzip -9n >"$out.tmp"
mv -f "$out.tmp" "$out"
echo "$out ($(wc -c <"$out" | tr -d ' ') bytes, installed $isize bytes)"
