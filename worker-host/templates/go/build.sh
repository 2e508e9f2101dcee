#!/bin/sh
# Builds lib{{lib}}.so (and the cgo header lib{{lib}}.h, which worker-host does not need).
set -eu
cd "$(dirname "$0")"
go build -buildmode=c-shared -o lib{{lib}}.so .
