#!/usr/bin/env bash
# Installs what lightron needs from Debian 12's packages, only if something is missing.
# Runs as root or through sudo. Used by `make demo` and `make test`.
set -euo pipefail
packages=(cmake make g++ libtorch-dev libgloo-dev libfmt-dev doctest-dev libcli11-dev
          nlohmann-json3-dev openmpi-bin libopenmpi-dev libopenblas0-openmp sentencepiece
          python3-torch python3-nbclient python3-ipykernel python3-matplotlib fortunes-min fortunes)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "lightron: installing ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# The OpenMP build of OpenBLAS honours one thread per rank; the pthread build (if also
# installed) wins by priority and ignores it. Select the OpenMP one explicitly.
arch_dir=/usr/lib/x86_64-linux-gnu
if [ -d "$arch_dir/openblas-openmp" ]; then
  for lib in libblas.so.3 liblapack.so.3; do
    want="$arch_dir/openblas-openmp/$lib"
    alt="$lib-x86_64-linux-gnu"
    if [ -e "$want" ] && [ "$(readlink -f "$arch_dir/$lib")" != "$(readlink -f "$want")" ]; then
      $sudo update-alternatives --set "$alt" "$want" >/dev/null
    fi
  done
fi
