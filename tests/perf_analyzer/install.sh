#!/usr/bin/env bash
# Installs Triton's perf_analyzer (PyPI perf-analyzer 2.60.0) into the folder given, for the tests
# and benchmarks. Its only wheel is built for glibc 2.38; Debian 12 has 2.36. So the binary runs
# through the dynamic loader of Debian 13's libc6 / libstdc++6 / libgcc-s1, unpacked (never
# installed) into a private sysroot beside it. Idempotent.
set -euo pipefail
DIR=${1:?usage: install.sh DIR}
[ -x "$DIR/bin/perf_analyzer" ] && "$DIR/bin/perf_analyzer" --version >/dev/null 2>&1 && exit 0
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY="$HERE/../../.marquee/venv/bin/python"
[ -x "$PY" ] || PY=python3
echo "[setup] perf_analyzer into $DIR"
mkdir -p "$DIR/dl"
"$PY" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_38_x86_64 \
  -d "$DIR/dl" "perf-analyzer==2.60.0"
rm -rf "$DIR/wheel" && mkdir -p "$DIR/wheel"
"$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
  "$DIR"/dl/perf_analyzer-2.60.0-*.whl "$DIR/wheel"
chmod +x "$DIR/wheel/perf_analyzer/bin/perf_analyzer"

# Debian 13 runtime libraries, fetched with a throwaway apt state so the system's is untouched.
APT="$DIR/apt"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs"
MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)
[ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" > "$APT/sources.list"
opts=(-o Dir::Etc::sourcelist="$APT/sources.list" -o Dir::Etc::sourceparts=/dev/null
      -o Dir::State::Lists="$APT/lists" -o Dir::Cache="$APT/cache" -o Debug::NoLocking=1)
apt-get "${opts[@]}" -o APT::Sandbox::User=root -qq update
(cd "$APT/debs" && apt-get "${opts[@]}" -o APT::Sandbox::User=root -qq download libc6 libstdc++6 libgcc-s1)
rm -rf "$DIR/sysroot" && mkdir -p "$DIR/sysroot"
for deb in "$APT"/debs/*.deb; do dpkg-deb -x "$deb" "$DIR/sysroot"; done

mkdir -p "$DIR/bin"
cat > "$DIR/bin/perf_analyzer" <<WRAP
#!/bin/sh
# perf_analyzer 2.60.0 started through Debian 13's loader and libraries (see install.sh).
LIB=$DIR/sysroot/usr/lib/x86_64-linux-gnu
exec "\$LIB/ld-linux-x86-64.so.2" --library-path "\$LIB:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" "$DIR/wheel/perf_analyzer/bin/perf_analyzer" "\$@"
WRAP
chmod +x "$DIR/bin/perf_analyzer"
"$DIR/bin/perf_analyzer" --version
