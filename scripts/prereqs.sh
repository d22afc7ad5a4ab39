#!/usr/bin/env bash
# Make sure the build prerequisites are present: a C compiler and a full perl
# (OpenSSL is built from source by the `openssl` crate's `vendored` feature and
# its Configure needs IPC::Cmd), plus the openssl CLI that one test uses as an
# independent verifier. On Debian they are installed when missing.
set -euo pipefail
missing=()
command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs first" >&2; exit 1; }
command -v cc >/dev/null || missing+=(build-essential)
command -v make >/dev/null || missing+=(make)
perl -MIPC::Cmd -e1 2>/dev/null || missing+=(perl)
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
if [ ${#missing[@]} -gt 0 ]; then
echo "installing build prerequisites: ${missing[*]}" >&2
if ! command -v apt-get >/dev/null; then
    echo "please install: a C compiler, make, perl (with IPC::Cmd) and openssl" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The OpenAPI checks of `make test` (scripts/check-openapi.py), from PyPI.
if ! python3 -c 'import openapi_spec_validator, jsonschema, referencing' 2>/dev/null; then
    echo "installing openapi-spec-validator (PyPI)" >&2
    python3 -m pip install -q --disable-pip-version-check openapi-spec-validator 2>/dev/null ||
        python3 -m pip install -q --disable-pip-version-check --break-system-packages openapi-spec-validator
fi
