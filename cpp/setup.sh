#!/bin/sh
# System packages the C++ consumer builds against, installed only when missing (Debian/Ubuntu):
# a compiler, CMake, nlohmann-json (manifest.json) and OpenSSL's libcrypto (sha256). libtorch
# comes from the project's torch wheel, not from here.
# Exit status: 0 ready, 3 missing and not installable here (not root, or no apt-get).
set -eu

need=""
[ -f /usr/include/nlohmann/json.hpp ] || need="$need nlohmann-json3-dev"
[ -f /usr/include/openssl/evp.h ] || need="$need libssl-dev"
command -v cmake >/dev/null 2>&1 || need="$need cmake"
command -v c++ >/dev/null 2>&1 || need="$need g++"
command -v make >/dev/null 2>&1 || need="$need make"
[ -z "$need" ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "cpp/setup.sh: missing$need; install them (apt-get install$need) as root" >&2
    exit 3
fi
echo "cpp/setup.sh: installing$need" >&2
export DEBIAN_FRONTEND=noninteractive
# Try the cached package lists first; refresh them only if that fails (a fresh image has none).
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $need >&2 ||
    { apt-get update -q >&2 && apt-get install -y -q --no-install-recommends $need >&2; }
