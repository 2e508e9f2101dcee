#!/bin/sh
# Builds lib{{lib}}.so, exporting only wh_handler_entry.
set -eu
cd "$(dirname "$0")"
${CC:-cc} -std=c11 -O2 -Wall -Wextra -pedantic -shared -fPIC \
  -Wl,--version-script=exports.map -o lib{{lib}}.so echo.c
