#!/bin/sh
# Builds lib{{lib}}.so, exporting only wh_handler_entry.
set -eu
cd "$(dirname "$0")"
${CXX:-c++} -std=c++17 -O2 -Wall -Wextra -pedantic -shared -fPIC \
  -Wl,--version-script=exports.map -o lib{{lib}}.so echo.cpp
