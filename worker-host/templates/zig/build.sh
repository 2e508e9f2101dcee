#!/bin/sh
# Builds lib{{lib}}.so. worker_host.zig is worker_host.h translated by Zig's C translator (what
# @cImport did before Zig removed it). Zig comes from PATH, else from PyPI's ziglang.
set -eu
cd "$(dirname "$0")"
if [ -z "${ZIG:-}" ]; then
  if command -v zig >/dev/null 2>&1; then ZIG=zig; else ZIG="python3 -m ziglang"; fi
fi
$ZIG translate-c -lc -I . worker_host.h > worker_host.zig
$ZIG build-lib -dynamic -O ReleaseSafe -lc echo.zig -femit-bin=lib{{lib}}.so
