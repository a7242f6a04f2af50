#!/bin/sh
# Installs the Debian package with the real Fashion-MNIST IDX files (the embedded default's dataset), where apt
# is available. Elsewhere tfl falls back to --data-dir, the Keras cache, then a download.
set -e
[ -d /usr/share/datasets/fashion-mnist ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
    echo "note: no apt-get; Fashion-MNIST will be read from --data-dir or the Keras cache, or downloaded"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
        echo "note: not root; run 'apt-get install dataset-fashion-mnist' as root for the offline dataset"
        exit 0
    fi
fi
$SUDO apt-get update -qq || true
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
